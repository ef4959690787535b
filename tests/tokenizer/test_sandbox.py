"""Untrusted chat templates render in a child process under a budget: the same text as Jinja in
this process, and a clean ChatTemplateError (never a hang, a crash or a swollen parent) for a
template that loops, allocates or writes without end."""

from __future__ import annotations

import os
import resource
import signal
import threading
import time

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmlab.tokenizer import chat, sandbox
from llmlab.tokenizer.chat import TEMPLATES, ChatTemplate, ChatTemplateError, encode_chat

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]


@pytest.fixture
def quick(monkeypatch):
    """A sandbox of its own with a short budget, closed afterwards."""
    box = sandbox.Sandbox(seconds=0.3, max_chars=10_000)
    monkeypatch.setattr(chat, "SANDBOX", box)
    yield box
    box.close()


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_the_child_renders_what_jinja_renders_here(name, quick):
    source = TEMPLATES[name][0]
    untrusted = ChatTemplate(source, "<|end|>", "<s>", "</s>", name)
    here = ImmutableSandboxedEnvironment(keep_trailing_newline=True).from_string(source)
    for end in (1, 2, 3, 4):
        for prompt in (True, False):
            expected = here.render(messages=MESSAGES[:end], add_generation_prompt=prompt, bos_token="<s>",
                                   eos_token="</s>")
            assert untrusted.render(MESSAGES[:end], prompt) == expected
    assert untrusted.render_many([(MESSAGES[:2], True), (MESSAGES, False)]) == [
        untrusted.render(MESSAGES[:2], True), untrusted.render(MESSAGES, False)]


RUNAWAYS = [
    ("{% for a in range(50000) %}{% for b in range(50000) %}{% endfor %}{% endfor %}", "budget of 0.3 s"),
    ("{% for a in range(50000) %}{% for b in range(50000) %}x{% endfor %}{% endfor %}", "longer than 10000"),
    ("{{ 'x' * 10**10 }}", "MiB"),
    ("{{ ('x' * 100000) | replace('x', 'x' * 100000) }}", "MiB"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "too deeply"),
    ("{{ raise_exception('only user turns, please') }}", "only user turns, please"),
    ("{{ messages.__class__.__mro__ }}", "unsafe"),
]


@pytest.mark.parametrize("source, message", RUNAWAYS)
def test_a_runaway_template_fails_its_render_and_the_next_one_works(source, message, quick):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError, match=f"chat template evil.jinja: .*{message}"):
        ChatTemplate(source, "<|end|>", name="evil.jinja").render(MESSAGES)
    assert time.monotonic() - t0 < 0.3 + sandbox.GRACE_SECONDS + 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: the child paid, not us
    assert ChatTemplate("{{ messages[1].content }}", "<|end|>").render(MESSAGES) == "Hi"


def test_a_constant_expression_is_not_folded_in_the_parent():
    """Jinja folds constants when it compiles: `'x' * 10**10` would be built at load time. An untrusted
    template is only parsed here; compiling is the child's, under its memory limit."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ChatTemplate("{{ 'x' * 10**10 }}", "<|end|>")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000


def test_a_child_stuck_past_its_grace_is_killed_and_replaced(quick, monkeypatch):
    monkeypatch.setattr(sandbox, "GRACE_SECONDS", 0.2)
    template = ChatTemplate("{{ messages[1].content }}", "<|end|>", name="t")
    assert template.render(MESSAGES) == "Hi"
    stuck = quick._process
    os.kill(stuck.pid, signal.SIGSTOP)  # a child that no timer of its own can wake
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError, match="budget"):
        template.render(MESSAGES)
    assert time.monotonic() - t0 < 2
    assert stuck.poll() is not None and quick._process is None
    assert template.render(MESSAGES) == "Hi"  # a new child
    assert quick._process.pid != stuck.pid


def test_a_child_that_dies_mid_render_is_an_error_and_one_dead_between_renders_is_replaced(quick):
    template = ChatTemplate("{{ messages[1].content }}", "<|end|>", name="t")
    assert template.render(MESSAGES) == "Hi"
    quick._process.kill()
    quick._process.wait()
    assert template.render(MESSAGES) == "Hi"
    slow = ChatTemplate("{% for a in range(50000) %}{% for b in range(50000) %}{% endfor %}{% endfor %}", "<|end|>",
                        name="slow")
    child = quick._process
    threading.Timer(0.1, child.kill).start()
    with pytest.raises(ChatTemplateError, match="crashed its render process"):
        slow.render(MESSAGES)
    assert template.render(MESSAGES) == "Hi"


def test_the_child_ignores_ctrl_c_and_leaves_when_its_parent_does(quick):
    template = ChatTemplate("{{ messages[1].content }}", "<|end|>", name="t")
    template.render(MESSAGES)
    child = quick._process
    os.kill(child.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    assert template.render(MESSAGES) == "Hi" and quick._process is child
    child.stdin.close()  # what the parent's exit does
    assert child.wait(timeout=5) == 0


def test_builtin_templates_render_in_this_process():
    assert chat.builtin_template("llmlab").trusted
    assert not ChatTemplate("x", "<|end|>").trusted


def test_loss_masks_come_from_one_trip_to_the_child(quick, monkeypatch):
    from llmlab.tokenizer import train_bpe

    tok = train_bpe(["Be brief. Hi Hello. 2+2? " * 20], vocab_size=300,
                    special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"])
    trusted = chat.builtin_template("llmlab")
    untrusted = ChatTemplate(trusted.source, trusted.stop, name="file")
    trips = []
    render = quick.render
    monkeypatch.setattr(quick, "render", lambda source, renders: trips.append(len(renders)) or render(source, renders))
    conversation = MESSAGES + [{"role": "assistant", "content": "4."}]
    assert encode_chat(untrusted, tok, conversation) == encode_chat(trusted, tok, conversation)
    assert trips == [4]  # two assistant turns: a prompt and a full rendering each


@pytest.mark.parametrize("text, message", [("", "empty"), ("   \n", "empty"),
                                           ("{% if true %}" * 5000 + "{% endif %}" * 5000, "nests too deeply"),
                                           ("{% for %}", "does not parse")])
def test_templates_that_cannot_be_used_are_refused_when_loaded(text, message):
    with pytest.raises(ChatTemplateError, match=message):
        ChatTemplate(text, "<|end|>", name="t.jinja")


def test_template_files_that_cannot_be_read_are_named(tmp_path):
    latin1 = tmp_path / "latin1.jinja"
    latin1.write_bytes(b"caf\xe9 {{ messages }}")
    with pytest.raises(ChatTemplateError, match=f"{latin1}: not UTF-8"):
        chat.load_chat_template(None, str(latin1))
    loop = tmp_path / "loop.jinja"
    loop.symlink_to(loop)
    with pytest.raises(ChatTemplateError, match=f"{loop}: cannot read it: .*symbolic links"):
        chat.load_chat_template(None, str(loop))
    with pytest.raises(ChatTemplateError, match="neither a built-in"):
        chat.load_chat_template(None, str(tmp_path / "missing.jinja"))
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ChatTemplateError, match="expected a JSON object"):
        chat.load_chat_template(tmp_path)


def test_a_forked_process_starts_its_own_child(quick):
    template = ChatTemplate("{{ messages[1].content }}", "<|end|>", name="t")
    assert template.render(MESSAGES) == "Hi"
    parent_child = quick._process
    pid = os.fork()
    if pid == 0:  # the pipes to the parent's child must not be shared: this copy starts its own
        ok = template.render(MESSAGES) == "Hi" and quick._process is not parent_child
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert template.render(MESSAGES) == "Hi" and quick._process is parent_child
