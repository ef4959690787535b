"""The server's tokenizer as vLLM serves it (/tokenizer_info, /tokenize, /detokenize), what lm-eval's
`local-completions` reads of it, the BOS convention it reports, and stop strings that fall inside a
longer token."""

from __future__ import annotations

import pytest
import torch

from llmlab.models import LlamaConfig, build_model
from llmlab.models.io import save_model
from llmlab.tokenizer import load_tokenizer, train_bpe
from llmlab.tokenizer.chat import builtin_template
from tests.serve.test_server import KEY, Server

try:
    import httpx
except ImportError:  # openai 3 ships its HTTP client as httpx2
    httpx = pytest.importorskip("httpx2")

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say (yes)."}]


def _checkpoint(root, add_bos: bool):
    """A tiny LLaMA whose tokenizer has ")." as one token beside "." itself."""
    tok = train_bpe([f"call f({i}). then g(x{i}). Sure (yes). Bye now!" for i in range(200)], vocab_size=300)
    assert tok.token_to_id(").") is not None and tok.token_to_id(".") is not None
    torch.manual_seed(0)
    save_model(build_model(LlamaConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=96)),
               root)
    tok.add_bos = add_bos
    tok.save(root)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server(_checkpoint(tmp_path_factory.mktemp("tok") / "tiny", add_bos=False), api_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def bos_server(tmp_path_factory):
    with Server(_checkpoint(tmp_path_factory.mktemp("tok") / "tiny", add_bos=True)) as s:
        yield s


def _post(server, route, body, key=KEY):
    return httpx.post(server.url + route, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _get(server, route, key=KEY):
    return httpx.get(server.url + route, headers={"Authorization": f"Bearer {key}"}, timeout=60)


# --------------------------------------------------------------------------- stop strings


def test_a_one_token_stop_string_stops_inside_a_longer_token(server):
    """stop="." is one token, but the model (forced by logit_bias) writes ")."; matched on the text,
    completions and chat end at that token, the text cut before the ".", streaming or not."""
    tok = load_tokenizer(server.ns.checkpoint)
    merged = tok.token_to_id(").")
    client = server.client()
    forced = {"logit_bias": {str(merged): 100}, "temperature": 0, "stop": ["."], "max_tokens": 8}
    r = client.completions.create(model="tiny", prompt="Sure (yes", **forced)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (")", "stop")
    assert r.usage.completion_tokens == 1  # it stopped at the token holding the match
    chunks = list(client.completions.create(model="tiny", prompt="Sure (yes", stream=True, **forced))
    assert "".join(c.choices[0].text for c in chunks) == ")" and chunks[-1].choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, **forced)
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == (")", "stop")
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True, **forced))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ")"
    assert chunks[-1].choices[0].finish_reason == "stop"


# --------------------------------------------------------------------------- the tokenizer routes


def test_tokenizer_info_reports_the_tokens_template_and_convention(server):
    tok = load_tokenizer(server.ns.checkpoint)
    info = _get(server, "/tokenizer_info").json()
    assert info == {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|eos|>",
                    "pad_token": "<|pad|>", "add_bos_token": False, "add_eos_token": False,
                    "chat_template": builtin_template("llmlab").source, "model_max_length": 96,
                    "vocab_size": tok.vocab_size}
    assert _get(server, "/v1/tokenizer_info").json() == info
    assert _get(server, "/tokenizer_info", key="wrong").status_code == 401  # the API key guards it


def test_tokenize_and_detokenize(server):
    tok = load_tokenizer(server.ns.checkpoint)
    text = "Sure (yes). <|eos|> Bye"
    r = _post(server, "/tokenize", {"prompt": text})
    assert r.status_code == 200, r.text
    ids = tok.encode(text)
    assert r.json() == {"count": len(ids), "max_model_len": 96, "tokens": ids, "token_strs": None}
    assert _post(server, "/v1/tokenize", {"prompt": text, "add_special_tokens": False, "model": "tiny"}).json()[
        "tokens"] == ids  # no BOS either way: this model saw none
    strs = _post(server, "/tokenize", {"prompt": "Sure (yes)", "return_token_strs": True}).json()["token_strs"]
    assert strs == [tok.backend.id_to_token(i) for i in tok.encode("Sure (yes)")]
    assert _post(server, "/tokenize", {"prompt": ""}).json()["tokens"] == []
    template = builtin_template("llmlab")
    for generation_prompt in (True, False):
        r = _post(server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": generation_prompt})
        assert r.json()["tokens"] == tok.encode(template.render(MESSAGES, generation_prompt))
    # the chat route bills exactly what /tokenize counts
    usage = server.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1).usage
    assert usage.prompt_tokens == _post(server, "/tokenize", {"messages": MESSAGES}).json()["count"]
    for route in ("/detokenize", "/v1/detokenize"):
        assert _post(server, route, {"tokens": ids}).json() == {"prompt": text}
    assert _post(server, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


def test_a_model_trained_with_bos_says_so_and_gets_it(bos_server):
    tok = load_tokenizer(bos_server.ns.checkpoint)
    assert tok.add_bos and tok.document_start_id == tok.bos_id
    info = _get(bos_server, "/tokenizer_info").json()
    assert (info["bos_token"], info["add_bos_token"]) == ("<|bos|>", True)
    ids = tok.encode("Sure (yes)")
    assert _post(bos_server, "/tokenize", {"prompt": "Sure (yes)"}).json()["tokens"] == [tok.bos_id, *ids]
    assert _post(bos_server, "/tokenize", {"prompt": "Sure (yes)", "add_special_tokens": False}).json()[
        "tokens"] == ids
    r = bos_server.client().completions.create(model="tiny", prompt="Sure (yes)", max_tokens=1)
    assert r.usage.prompt_tokens == len(ids) + 1  # completions prompts start with BOS, as training did


@pytest.mark.parametrize("route, body, field", [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": ["hi"]}, "prompt"),
    ("/tokenize", {"prompt": "hi", "messages": MESSAGES}, "prompt"),
    ("/tokenize", {"prompt": "hi", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/tokenize", {"prompt": "hi", "add_generation_prompt": True}, "add_generation_prompt"),
    ("/tokenize", {"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ("/tokenize", {"messages": "hi"}, "messages"),
    ("/tokenize", {"prompt": "hi", "frobnicate": 1}, "frobnicate"),
    ("/tokenize", {"prompt": "hi", "model": 5}, "model"),
    ("/detokenize", {}, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, "tokens"),
    ("/detokenize", {"tokens": [1, True]}, "tokens"),
    ("/detokenize", {"tokens": [1, 300]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [1], "prompt": "x"}, "prompt"),
])
def test_bad_tokenizer_requests_name_the_field(server, route, body, field):
    r = _post(server, route, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_a_wrong_model_name_is_a_404(server):
    assert _post(server, "/tokenize", {"prompt": "hi", "model": "other"}).status_code == 404


# --------------------------------------------------------------------------- lm-eval


@pytest.mark.parametrize("which", ["server", "bos_server"])
def test_lm_eval_uses_the_served_tokenizer_from_the_address_alone(which, request):
    """lm-eval's remote tokenizer, given the server's address (and the key a server asks for), detects
    the tokenizer routes, encodes as the server does, and learns which token precedes a document."""
    utils = pytest.importorskip("lm_eval.utils")
    served = request.getfixturevalue(which)
    tok = load_tokenizer(served.ns.checkpoint)
    key = KEY if which == "server" else None
    url = served.url + "/v1/completions"
    assert utils.check_remote_tokenizer_support(url, auth_token=key)
    remote = utils.RemoteTokenizer(url, auth_token=key)
    assert remote.eos_token_id == tok.eos_id
    assert remote.bos_token_id == (tok.bos_id if tok.add_bos else None)
    # HF's rule (lm-eval's `hf` backend): the BOS when there is one, else the EOS
    assert (remote.eos_token_id if remote.bos_token_id is None else remote.bos_token_id) == tok.document_start_id
    text = "Sure (yes). Bye now!"
    assert remote.encode(text) == tok.encode(text) and remote.decode(tok.encode(text)) == text
    assert remote.apply_chat_template(MESSAGES) == builtin_template("llmlab").render(MESSAGES)


def test_lm_eval_local_completions_needs_only_the_address_and_the_model(server):
    pytest.importorskip("lm_eval")
    for extra in ("aiohttp", "tenacity"):  # lm-eval's `api` extra
        pytest.importorskip(extra)
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    tok = load_tokenizer(server.ns.checkpoint)
    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="tiny", auth_token=KEY)
    assert lm.tokenizer_backend == "remote"
    assert lm.tok_encode("Sure (yes). Bye") == tok.encode("Sure (yes). Bye")
    assert lm.prefix_token_id == tok.eos_id == tok.document_start_id  # no BOS in training: EOS starts a document
    # (for a model trained with BOS, lm-eval 0.4's remote backend takes `bos_token_id or eos_token_id`,
    # which passes over llmlab's BOS id of 0: give it custom_prefix_token_id=<document_start_id>)
