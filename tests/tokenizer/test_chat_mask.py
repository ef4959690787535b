"""Instruction-tuning masks: exactly the assistant's tokens (with the end-of-turn marker and EOS) train."""

from __future__ import annotations

import pytest

from llmlab.tokenizer import train_bpe
from llmlab.tokenizer.chat import ChatTemplate, ChatTemplateError, builtin_template, encode_chat

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six, of course."},
]


@pytest.fixture(scope="module")
def tok():
    lines = [f"What is {i} plus {i}? It is {2 * i}, of course. Be brief. And three, four, six." for i in range(300)]
    return train_bpe(lines, vocab_size=400)


def _trained_text(tok, ids, mask):
    """The trained tokens, decoded run by run."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


@pytest.mark.parametrize("name", ["llmlab", "chatml", "llama3", "llama2"])
def test_mask_covers_exactly_the_assistant_turns(tok, name):
    template = builtin_template(name, bos_token="<|bos|>", eos_token="<|eos|>")
    ids, mask = encode_chat(template, tok, CONVERSATION)
    assert len(ids) == len(mask)
    runs = _trained_text(tok, ids, mask)
    stop = template.stop if name != "llama2" else "<|eos|>"  # llama2 ends a turn with the eos token
    if name == "llama2":
        assert runs == [" Four. <|eos|>", " Six, of course. <|eos|>"]
    else:
        assert runs == [f"Four.{stop}", f"Six, of course.{stop}<|eos|>"]
    assert ids[-1] == tok.eos_id and mask[-1]
    # everything before the first answer is the prompt, untrained, and re-renders exactly
    first = mask.index(True)
    assert tok.decode(ids[:first]) == template.render(CONVERSATION[:2])


def test_without_eos_and_trailing_user_turn_left_out(tok):
    template = builtin_template("llmlab")
    ids, mask = encode_chat(template, tok, CONVERSATION[:4], add_eos=False)
    assert ids[-1] != tok.eos_id
    assert _trained_text(tok, ids, mask) == ["Four.<|end|>"]
    assert "three" not in tok.decode(ids)


@pytest.mark.parametrize("messages, match", [
    (CONVERSATION[:2], "no assistant turn"),
    ([{"role": "assistant", "content": "Hi"}], r"messages\[0\]: the conversation opens"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}], r"messages\[1\]: empty assistant"),
    ([{"role": "user", "content": 3}], r"messages\[0\].content: expected a string"),
])
def test_bad_conversations_are_named(tok, messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        encode_chat(builtin_template("llmlab"), tok, messages)


def test_templates_that_raise_or_rewrite_history_are_refused(tok):
    raising = ChatTemplate("{{ raise_exception('only user turns') }}", "<|end|>", name="strict")
    with pytest.raises(ChatTemplateError, match="only user turns"):
        encode_chat(raising, tok, CONVERSATION)
    # a template that prints the number of messages first changes earlier text as turns are added
    rewriting = ChatTemplate("{{ messages | length }}{% for m in messages %}{{ m.content }}<|end|>{% endfor %}",
                             "<|end|>", name="counting")
    with pytest.raises(ChatTemplateError, match="does not extend"):
        encode_chat(rewriting, tok, CONVERSATION)
