"""The OpenAI-compatible server on loopback: the official `openai` client, streaming and not, usage
that matches the tokenizer, continuous batching, and a table of bad requests that each get a 4xx."""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time

import pytest
import torch

from llmlab.generate import Engine, SamplingParams
from llmlab.models import LlamaConfig, build_model
from llmlab.models.io import save_model
from llmlab.tokenizer import train_bpe

openai = pytest.importorskip("openai")
try:
    import httpx
except ImportError:  # openai 3 ships its HTTP client as httpx2
    httpx = pytest.importorskip("httpx2")
uvicorn = pytest.importorskip("uvicorn")

KEY = "sk-test-Key-123"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    tok = train_bpe([f"Hello there, the answer is {i}. Say hi to {i} friends!" for i in range(300)], vocab_size=320)
    torch.manual_seed(0)
    save_model(build_model(LlamaConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=96)),
               root / "tiny")
    tok.save(root / "tiny")
    return root / "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint, **overrides):
        from llmlab.serve.commands import build

        args = dict(checkpoint=str(checkpoint), tokenizer=None, device="cpu", bos=False, host="127.0.0.1",
                    port=_free_port(), api_key=None, served_model_name="tiny", template=None, max_batch=8,
                    max_queue=64, max_tokens=None, max_n=4, cors_origin=[])
        args.update(overrides)
        self.ns = argparse.Namespace(**args)
        self.app, self.worker = build(self.ns)
        self.url = f"http://127.0.0.1:{self.ns.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.ns.port, log_level="error"))

    def __enter__(self):
        self.worker.start()
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.02)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.worker.stop()

    def client(self, key=KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def server(checkpoint):
    with Server(checkpoint, api_key=KEY) as s:
        yield s


def _engine_text(server, prompt_ids, n_tokens):
    out = Engine(server.worker.scheduler.model).generate(
        [prompt_ids], SamplingParams(temperature=0.0, max_new_tokens=n_tokens, stop_token_ids=(1,)))[0]
    return out.token_ids


def test_completions_match_the_engine_and_usage_matches_the_tokenizer(server):
    from llmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(server.ns.checkpoint)
    client = server.client()
    r = client.completions.create(model="tiny", prompt="Hello there, the", max_tokens=12, temperature=0)
    ids = tok.encode("Hello there, the")
    assert r.usage.prompt_tokens == len(ids)
    expected = Engine(server.worker.scheduler.model).generate(
        [ids], SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=(tok.eos_id,)))[0]
    body = [t for t in expected.token_ids if t != tok.eos_id]
    assert r.choices[0].text == tok.decode(body, skip_special=True)  # special tokens are not text (vLLM's default)
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length") and r.object == "text_completion"


def test_completions_prompt_forms_n_seed_echo_logprobs(server):
    client = server.client()
    r = client.completions.create(model="tiny", prompt=["Hello", "Say hi"], max_tokens=5, n=2, temperature=1.0,
                                  seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="tiny", prompt=["Hello", "Say hi"], max_tokens=5, n=2, temperature=1.0,
                                      seed=3)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]  # seeded: repeats exactly
    ids = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3
    scored = client.completions.create(model="tiny", prompt="Hello there", max_tokens=0, echo=True, logprobs=2)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == "Hello there" and lp.token_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and len(lp.top_logprobs[1]) == 2
    assert "".join(lp.tokens) == "Hello there" and lp.text_offset[0] == 0
    gen = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, logprobs=1, temperature=0)
    assert len(gen.choices[0].logprobs.token_logprobs) == gen.usage.completion_tokens
    stream = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, logprobs=1, temperature=0,
                                       stream=True)  # each chunk's text_offset counts on from the one before
    offsets = [o for c in stream if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == gen.choices[0].logprobs.text_offset


def test_logit_bias_steers_sampling_and_unimplemented_fields_are_refused_by_name(server):
    from llmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(server.ns.checkpoint)
    client = server.client()
    first = _engine_text(server, [5, 6, 7], 1)[0]
    forced = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=4, temperature=1.0, seed=1,
                                       logit_bias={"300": 100})
    assert forced.choices[0].text == tok.decode([300] * 4)
    second = Engine(server.worker.scheduler.model).generate(
        [[5, 6, 7]], SamplingParams(temperature=0.0, max_new_tokens=1, logit_bias={first: -100}))[0].token_ids[0]
    assert second != first
    banned = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text == tok.decode([second])
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          logit_bias={"301": 100}, user="someone", temperature=0)
    assert chat.choices[0].message.content == tok.decode([301] * 3)
    for field, value in [("best_of", 2), ("suffix", "end"), ("tools", [{"type": "function"}]),
                         ("response_format", {"type": "json_object"}), ("frobnicate", 1)]:
        r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"messages": [{"role": "user", "content": "Hi"}], field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    ok = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                    json={"prompt": "Hi", "max_tokens": 1, "best_of": 1, "suffix": None, "store": False})
    assert ok.status_code == 200, ok.text


def test_stop_strings_cut_the_text(server):
    client = server.client()
    full = client.completions.create(model="tiny", prompt="Hello there", max_tokens=20, temperature=0).choices[0].text
    if len(full) < 4:
        pytest.skip("the random model stopped at once")
    stop = full[2:4]
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_streaming_completions_and_chat(server):
    client = server.client()
    whole = client.completions.create(model="tiny", prompt="Hello", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == whole.choices[0].finish_reason
    scored = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0, stream=True,
                                            logprobs=2))
    assert sum(len(c.choices[0].logprobs.token_logprobs) for c in scored if c.choices[0].logprobs) == 4

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"
    from llmlab.tokenizer import load_tokenizer
    from llmlab.tokenizer.chat import load_chat_template

    tok = load_tokenizer(server.ns.checkpoint)
    assert chat.usage.prompt_tokens == len(tok.encode(load_chat_template(server.ns.checkpoint).render(messages)))
    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    lp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, logprobs=True, top_logprobs=2)
    assert len(lp.choices[0].logprobs.content[0].top_logprobs) == 2
    streamed = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, logprobs=True,
                                                   stream=True))
    assert sum(len(c.choices[0].logprobs.content) for c in streamed if c.choices[0].logprobs) == \
        len(lp.choices[0].logprobs.content)


def test_models_health_and_auth(server):
    assert [m.id for m in server.client().models.list()] == ["tiny"]
    assert httpx.get(server.url + "/health").status_code == 200  # open without a key
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        server.client(KEY.lower()).models.list()  # a key in another case is another key
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def _concurrently(n: int, ask) -> list:
    """ask(0) .. ask(n - 1), each in its own thread at once; their results in order."""
    results = [None] * n

    def run(i):
        results[i] = ask(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_requests_share_the_batch(server):
    client = server.client()
    results = _concurrently(6, lambda i: client.completions.create(model="tiny", prompt=f"Say hi to {i}", max_tokens=15,
                                                                   temperature=0).choices[0].text)
    alone = [client.completions.create(model="tiny", prompt=f"Say hi to {i}", max_tokens=15,
                                       temperature=0).choices[0].text for i in range(6)]
    assert results == alone


BAD = [  # (body or raw bytes, expected status, a word of the message)
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b"42", 400, "JSON object"),
    (b"null", 400, "JSON object"),
    ({"prompt": []}, 400, "empty"),
    ({"prompt": [""]}, 400, "empty prompt"),
    ({"prompt": ""}, 400, "empty prompt"),
    ({}, 400, "prompt: required"),
    ({"prompt": [1, 99999]}, 400, "outside the vocabulary"),
    ({"prompt": [[1, 2], [-1]]}, 400, "outside the vocabulary"),
    ({"prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "echo"),
    ({"prompt": "hi", "n": 10000}, 400, "n:"),
    ({"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"prompt": "hi", "stop": [""]}, 400, "must not be empty"),
    ({"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ({"prompt": "hi " * 200, "max_tokens": 4}, 400, "maximum context length"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "does not exist"),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"prompt": "hi", "seed": -3}, 400, "seed"),
]


@pytest.mark.parametrize("body, status, word", BAD)
def test_bad_completion_requests_get_a_4xx_and_the_server_keeps_serving(server, body, status, word):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/completions", content=content,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert word in error["message"] and {"message", "type", "param", "code"} <= error.keys()
    assert server.client().completions.create(model="tiny", prompt="Hello", max_tokens=2).choices


@pytest.mark.parametrize("body, word", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user"}]}, "'role' and 'content'"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "requires logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi " * 300}]}, "maximum context length"),
    ({"messages": "hi"}, "non-empty list"),
])
def test_bad_chat_requests(server, body, word):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and word in r.json()["error"]["message"], r.text


def _wait(condition, seconds=10.0):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_a_full_queue_answers_429_with_retry_after(checkpoint):
    with Server(checkpoint, max_batch=1, max_queue=1) as s:
        scheduler, decode = s.worker.scheduler, s.worker.scheduler._decode
        scheduler._decode = lambda tokens: (time.sleep(0.02), decode(tokens))  # 80 tokens last over a second
        client = s.client()
        done = []

        def ask():
            done.append(client.completions.create(model="tiny", prompt="Hello", max_tokens=80, temperature=0))

        first, second = threading.Thread(target=ask), threading.Thread(target=ask)
        first.start()
        _wait(lambda: s.worker.load["running"] == 1 and s.worker.load["waiting"] == 0)  # the one row is taken
        second.start()
        _wait(lambda: s.worker.load["waiting"] == 1)  # the waiting room is full
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
        first.join()
        second.join()
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert len(done) == 2  # the two admitted requests were served


def test_a_disconnected_stream_frees_its_row(checkpoint):
    with Server(checkpoint, max_batch=2) as s:
        with httpx.stream("POST", s.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 80,
                                                                   "stream": True, "temperature": 0}) as r:
            next(r.iter_lines())  # the first chunk arrived: the sequence is running
        for _ in range(100):
            if not s.worker.scheduler.busy:
                break
            time.sleep(0.05)
        assert not s.worker.scheduler.busy
        assert s.client().completions.create(model="tiny", prompt="Hello", max_tokens=2).choices


# --------------------------------------------------------------------------- an encoder-decoder


@pytest.fixture(scope="module")
def t5_server(tmp_path_factory):
    """A tiny T5 (input up to 40 tokens, output up to 10) whose greedy outputs vary from token to token."""
    from llmlab.models import T5Config

    root = tmp_path_factory.mktemp("served-t5")
    tok = train_bpe([f"Hello there, the answer is {i}. Say hi to {i} friends!" for i in range(300)], vocab_size=320)
    torch.manual_seed(0)
    save_model(build_model(T5Config(vocab_size=320, dim=32, n_layers=2, n_heads=4, head_dim=8, hidden_dim=64,
                                    max_seq_len=40, max_target_len=10, eos_id=tok.eos_id, dropout=0.0,
                                    tie_embeddings=False, init_std=3.0)), root / "t5")
    tok.save(root / "t5")
    with Server(root / "t5", api_key=KEY) as s:
        yield s


def _t5_generator(server):
    from llmlab.generate.text import TextGenerator
    from llmlab.models.io import load_model
    from llmlab.tokenizer import load_tokenizer

    return TextGenerator(load_model(server.ns.checkpoint).eval(), load_tokenizer(server.ns.checkpoint))


def test_an_encoder_decoder_completes_as_the_text_generator(t5_server):
    generator = _t5_generator(t5_server)
    tok = generator.tokenizer
    client = t5_server.client()
    for prompt in ("Hello there, the", "Say hi to 7 friends!"):
        want = generator.complete([prompt], SamplingParams(temperature=0.0, max_new_tokens=8))[0]
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (want.text, want.finish_reason)
        assert r.usage.prompt_tokens == len(tok.encode(prompt, eos=True))  # T5's input ends with EOS
        assert r.usage.completion_tokens == len(want.token_ids)
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason == want.finish_reason
    ids = tok.encode("Hello there", eos=True)
    want = generator.complete([ids], SamplingParams(temperature=0.0, max_new_tokens=10))[0]
    r = client.completions.create(model="tiny", prompt=ids, temperature=0, logprobs=2, max_tokens=10)
    assert r.choices[0].text == want.text and len(r.choices[0].logprobs.token_logprobs) == len(want.token_ids)
    sampled = dict(model="tiny", prompt=["Hello", "Say hi"], max_tokens=6, n=2, temperature=1.0, seed=3)
    first, again = client.completions.create(**sampled), client.completions.create(**sampled)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded: repeats exactly
    if len(want.text) >= 4:
        cut = client.completions.create(model="tiny", prompt=ids, temperature=0, max_tokens=10, stop=[want.text[2:4]])
        assert cut.choices[0].text == want.text[:want.text.index(want.text[2:4])]


def test_an_encoder_decoder_batches_concurrent_requests(t5_server):
    client = t5_server.client()
    results = _concurrently(5, lambda i: client.completions.create(
        model="tiny", prompt=f"Say hi to {i * 11} friends", max_tokens=3 + i, temperature=0).choices[0].text)
    generator = _t5_generator(t5_server)
    assert results == [generator.complete([f"Say hi to {i * 11} friends"], SamplingParams(
        temperature=0.0, max_new_tokens=3 + i))[0].text for i in range(5)]


def test_an_encoder_decoder_chats_within_its_decoder_limit(t5_server):
    from llmlab.tokenizer.chat import load_chat_template

    client = t5_server.client()
    messages = [{"role": "user", "content": "Say hi"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, temperature=0)  # no max_tokens: 10
    text = load_chat_template(t5_server.ns.checkpoint).render(messages)
    generator = _t5_generator(t5_server)
    want = generator.complete([text], SamplingParams(temperature=0.0, max_new_tokens=10), stop=["<|end|>"])[0]
    assert chat.choices[0].message.content == want.text and chat.usage.completion_tokens == len(want.token_ids)
    assert chat.usage.prompt_tokens == len(generator.encode(text))
    assert chat.usage.prompt_tokens == httpx.post(t5_server.url + "/tokenize", json={"messages": messages},
                                                  headers={"Authorization": f"Bearer {KEY}"}).json()["count"]
    stream = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want.text


def test_an_encoder_decoder_reports_its_input_limit(t5_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    card = httpx.get(t5_server.url + "/v1/models", headers=headers).json()["data"][0]
    info = httpx.get(t5_server.url + "/tokenizer_info", headers=headers).json()
    assert card["max_model_len"] == info["model_max_length"] == 40 and info["add_eos_token"] is True


@pytest.mark.parametrize("route, body, param, words", [
    ("/v1/completions", {"prompt": "hi " * 60}, "prompt", "maximum context length is 40 tokens for the prompt"),
    ("/v1/completions", {"prompt": [5] * 41, "max_tokens": 2}, "prompt", "you requested 41 tokens in the prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 11}, "max_tokens", "max_tokens: 11 is out of range [0, 10]"),
    ("/v1/completions", {"prompt": "hi", "echo": True, "max_tokens": 0, "logprobs": 1}, "echo",
     "not available for an encoder-decoder"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "must be at least 1 (an encoder-decoder"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 60}]}, "messages",
     "maximum context length is 40 tokens for the prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 11}, "max_tokens",
     "max_tokens: 11 is out of range [1, 10]"),
])
def test_an_encoder_decoder_refuses_what_it_cannot_do(t5_server, route, body, param, words):
    r = httpx.post(t5_server.url + route, json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert words in r.json()["error"]["message"]
