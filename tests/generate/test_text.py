"""Text on top of the engine: stop strings, streaming deltas, chat templates and history trimming."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.generate import GenerationError, SamplingParams
from llmlab.generate.text import ChatSession, TextGenerator, _held_back
from llmlab.tokenizer import train_bpe
from llmlab.tokenizer.chat import ChatTemplateError, builtin_template, check_messages, load_chat_template
from tests.generate.tables import TableLM

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=40)
SCRIPT = "Sure: the answer is 42. Bye!"


@pytest.fixture(scope="module")
def tok():
    lines = [f"line {i}: the answer is {i * 7}. Sure, bye now! Hello world." for i in range(200)]
    return train_bpe(lines, vocab_size=320)


def scripted(tok, text: str, then_eos: bool = True) -> tuple[TableLM, list[int]]:
    """A model that, after token `start`, greedily writes `text` and then EOS (or loops)."""
    ids = tok.encode(text)
    assert len(set(ids)) == len(ids), "the script needs distinct tokens for a bigram model"
    start = tok.token_to_id("<|bos|>")
    table = torch.zeros(tok.vocab_size, tok.vocab_size)
    for a, b in zip([start] + ids, ids):
        table[a, b] = 20.0
    table[ids[-1], tok.eos_id if then_eos else ids[-1]] = 20.0
    return TableLM(table, max_seq_len=128), [start]


def test_eos_ends_the_text_and_is_not_part_of_it(tok):
    model, prompt = scripted(tok, SCRIPT)
    gen = TextGenerator(model, tok)
    c = gen.complete([tok.decode(prompt)], GREEDY)[0]
    assert c.text == SCRIPT and c.finish_reason == "stop" and c.token_ids[-1] == tok.eos_id


def test_stop_string_cuts_the_text_before_it(tok):
    model, prompt = scripted(tok, SCRIPT)
    c = TextGenerator(model, tok).complete([tok.decode(prompt)], GREEDY, stop=["42"])[0]
    assert c.text == "Sure: the answer is " and c.finish_reason == "stop"
    assert "42" in tok.decode(c.token_ids)  # generation stopped right after the match appeared
    assert not tok.decode(c.token_ids).endswith("Bye!")


def test_a_special_token_stop_string_becomes_a_stop_token(tok):
    gen = TextGenerator(scripted(tok, SCRIPT)[0], tok)
    params, text_stops = gen._params(GREEDY, ["<|end|>", "Bye"])
    assert tok.token_to_id("<|end|>") in params.stop_token_ids and tok.eos_id in params.stop_token_ids
    assert text_stops == ["Bye"]


@pytest.mark.parametrize("stop", [[], ["answer is 4"], ["Bye"], ["zzz"]])
def test_streamed_deltas_add_up_to_the_completion(tok, stop):
    model, prompt = scripted(tok, SCRIPT, then_eos=False)
    gen = TextGenerator(model, tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=30)
    deltas = list(gen.stream(prompt, params, stop=stop))
    whole = gen.complete([tok.decode(prompt)], params, stop=stop)[0]
    assert "".join(d.text for d in deltas) == whole.text
    assert deltas[-1].finish_reason == whole.finish_reason
    assert all(d.finish_reason is None for d in deltas[:-1])
    for s in stop:  # nothing of a stop string is ever shown
        assert s not in "".join(d.text for d in deltas)


@pytest.fixture(scope="module")
def punct_tok():
    """A tokenizer with ")." merged into one token, beside the byte token "."."""
    tok = train_bpe([f"call f({i}). then g(x{i}). Sure (yes). Bye now!" for i in range(200)], vocab_size=300)
    assert tok.token_to_id(").") is not None and tok.token_to_id(".") is not None
    return tok


PUNCT_SCRIPT = "Sure (yes). Bye now!"


def test_a_one_token_stop_string_stops_inside_a_longer_token(punct_tok):
    """stop="." is one token, but the model writes it inside ")."; matched on the text, generation ends
    at that token with the text cut before the "." (before, it ran on to max_tokens)."""
    tok = punct_tok
    merged = tok.token_to_id(").")
    assert merged in tok.encode(PUNCT_SCRIPT)
    model, prompt = scripted(tok, PUNCT_SCRIPT, then_eos=False)  # loops on "!": only a stop string ends it
    gen = TextGenerator(model, tok)
    params, text_stops = gen._params(GREEDY, ["."])
    assert text_stops == ["."] and tok.token_to_id(".") not in params.stop_token_ids
    c = gen.complete([tok.decode(prompt)], GREEDY, stop=["."])[0]
    assert (c.text, c.finish_reason) == ("Sure (yes)", "stop")
    assert c.token_ids[-1] == merged  # it stopped at the token that holds the match
    deltas = list(gen.stream(prompt, GREEDY, stop=["."]))
    assert "".join(d.text for d in deltas) == "Sure (yes)" and deltas[-1].finish_reason == "stop"


def test_held_back_text_covers_partial_stop_strings_and_partial_characters():
    assert _held_back("the answ", ["answer"]) == 4
    assert _held_back("the answer", ["xyz"]) == 0
    assert _held_back("caf\ufffd", []) == 1


def test_stream_refuses_several_completions(tok):
    gen = TextGenerator(scripted(tok, SCRIPT)[0], tok)
    with pytest.raises(GenerationError, match="n and num_beams must be 1"):
        next(gen.stream("x", SamplingParams(n=2)))


def test_empty_stop_string_is_an_error(tok):
    gen = TextGenerator(scripted(tok, SCRIPT)[0], tok)
    with pytest.raises(GenerationError, match="stop string must not be empty"):
        gen.complete(["x"], GREEDY, stop=[""])


# --------------------------------------------------------------------------- chat templates


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]


def test_llmlab_template_renders_roles_and_the_generation_prompt():
    t = builtin_template("llmlab")
    assert t.render(MESSAGES[:2]) == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert t.render(MESSAGES[:2], add_generation_prompt=False).endswith("Hi<|end|>\n")


@pytest.mark.parametrize("name, expected", [
    ("chatml", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ("llama3", "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("llama2", "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"),
])
def test_builtin_templates(name, expected):
    assert builtin_template(name, bos_token="<s>", eos_token="</s>").render(MESSAGES[:2]) == expected


def test_llama2_template_closes_assistant_turns_with_eos():
    out = builtin_template("llama2", "<s>", "</s>").render(MESSAGES)
    assert out == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] 2+2? [/INST]")


def test_templates_render_in_a_sandbox():
    from llmlab.tokenizer.chat import ChatTemplate

    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", "<|end|>")
    with pytest.raises(ChatTemplateError, match="failed to render"):
        evil.render(MESSAGES)
    mutate = ChatTemplate("{% set _ = messages.append(1) %}", "<|end|>")
    with pytest.raises(ChatTemplateError, match="failed to render"):
        mutate.render(MESSAGES)
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for %}", "<|end|>")
    raising = ChatTemplate("{{ raise_exception('only user and assistant roles') }}", "<|end|>")
    with pytest.raises(ChatTemplateError, match="only user and assistant roles"):
        raising.render(MESSAGES)


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ([{"role": "user"}], r"messages\[0\]: expected an object with 'role' and 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], r"messages\[1\].role: expected one of"),
    ([{"role": "user", "content": 3}], r"messages\[0\].content: expected a string"),
])
def test_malformed_messages_name_the_message(messages, message):
    with pytest.raises(ChatTemplateError, match=message):
        check_messages(messages)


def test_a_checkpoint_template_wins_and_a_file_or_name_can_override(tmp_path):
    assert load_chat_template(tmp_path).name == "llmlab"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}", "eos_token": "<E>"}))
    t = load_chat_template(tmp_path)
    assert t.render(MESSAGES[1:2]) == "[user]Hi" and t.stop == "<E>"
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    assert load_chat_template(tmp_path).render(MESSAGES[1:2]) == "Hi!"
    assert load_chat_template(tmp_path, "chatml").name == "chatml"
    with pytest.raises(ChatTemplateError, match="neither a built-in"):
        load_chat_template(tmp_path, "nope")
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(ChatTemplateError, match="tokenizer_config.json: not a readable JSON"):
        load_chat_template(tmp_path)


# --------------------------------------------------------------------------- chat sessions


def test_chat_session_streams_a_reply_and_keeps_the_history(tok):
    reply = "Sure, bye now!"
    ids = tok.encode(reply)
    end = tok.token_to_id("<|end|>")
    assistant_header = tok.encode("<|assistant|>\n")
    table = torch.zeros(tok.vocab_size, tok.vocab_size)
    for a, b in zip([assistant_header[-1]] + ids, ids + [end]):
        table[a, b] = 20.0
    gen = TextGenerator(TableLM(table, max_seq_len=128), tok)
    session = ChatSession(gen, builtin_template("llmlab"), SamplingParams(temperature=0.0, max_new_tokens=20),
                          system="Be brief.")
    assert "".join(d.text for d in session.send("Hello")) == reply
    assert session.messages[-1] == {"role": "assistant", "content": reply}
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    stopped = ChatSession(gen, builtin_template("llmlab"), SamplingParams(temperature=0.0, max_new_tokens=20),
                          stop=["bye"])
    assert "".join(d.text for d in stopped.send("Hello")) == "Sure, "


def test_chat_history_is_trimmed_oldest_first_to_fit_the_context(tok):
    gen = TextGenerator(TableLM(torch.zeros(tok.vocab_size, tok.vocab_size), max_seq_len=64), tok)
    session = ChatSession(gen, builtin_template("llmlab"), SamplingParams(max_new_tokens=16), system="Be brief.")
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        history += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    history.append({"role": "user", "content": "last one"})
    ids, dropped = session.prompt_ids(history)
    text = tok.decode(ids)
    assert dropped > 0 and len(ids) + 16 <= 64
    assert text.startswith("<|system|>\nBe brief.") and "last one" in text and "question 0" not in text
    with pytest.raises(GenerationError, match="even with only the newest message"):
        session.prompt_ids([{"role": "user", "content": "word " * 100}])
