"""Chat templates: a list of messages -> the prompt text a chat model was trained on.

Templates are Jinja, as in HF `tokenizer_config.json` files, and render in an immutable sandbox
(no attribute access to Python internals, no mutation of the arguments), so a template shipped
with a downloaded checkpoint cannot run code; such a template also renders in a child process
under a time, memory and length budget (`sandbox.py`), so it cannot hang or exhaust the process
that uses it. Built-in templates cover llmlab's own special tokens and the common published
formats, and render in-process; a checkpoint's own `chat_template` wins when present.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmlab.common import LlmlabError
from llmlab.tokenizer.sandbox import RenderError, Sandbox

ROLES = ("system", "user", "assistant")

# name -> (Jinja source, the text that ends an assistant turn)
TEMPLATES: dict[str, tuple[str, str]] = {
    # llmlab's tokenizers reserve <|system|>, <|user|>, <|assistant|> and <|end|>
    "llmlab": ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}", "<|end|>"),
    # ChatML (Qwen2 and many fine-tunes)
    "chatml": ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "<|im_end|>"),
    # Llama 3 instruct
    "llama3": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
               "{{ m.content | trim }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
               "<|eot_id|>"),
    # Llama 2 chat and Mistral instruct: [INST] blocks, the system prompt folded into the first one
    "llama2": ("{% set system = messages[0].content if messages and messages[0].role == 'system' else '' %}"
               "{% for m in messages if m.role != 'system' %}"
               "{% if m.role == 'user' %}{{ bos_token }}[INST] "
               "{% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
               "{{ m.content | trim }} [/INST]{% else %} {{ m.content | trim }} {{ eos_token }}{% endif %}"
               "{% endfor %}", "</s>"),
}


class ChatTemplateError(LlmlabError):
    """A template that does not parse or render, or messages of the wrong shape."""


def check_messages(messages: list, source: str = "messages") -> list[dict[str, str]]:
    """Messages as OpenAI's API has them: a list of {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError(f"{source}: expected a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatTemplateError(f"{source}[{i}]: expected an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ChatTemplateError(f"{source}[{i}].role: expected one of {', '.join(ROLES)}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ChatTemplateError(f"{source}[{i}].content: expected a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _raise(message: str):
    raise ChatTemplateError(f"chat template: {message}")


SANDBOX = Sandbox()  # where templates from files and checkpoints render; its child starts on first use


@dataclass
class ChatTemplate:
    source: str  # Jinja text
    stop: str  # text that ends an assistant turn: a stop string (or special token) for generation
    bos_token: str = ""
    eos_token: str = ""
    name: str = "custom"  # a built-in's name or the file the template came from, for messages
    trusted: bool = False  # llmlab's own: renders in-process; otherwise in the sandbox's child

    def __post_init__(self):
        if not self.source.strip():
            raise ChatTemplateError(f"chat template {self.name}: the template is empty")
        env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True)
        env.globals["raise_exception"] = _raise
        try:  # parsing is linear in the source; compiling folds constants (`'x' * 10**10`): the sandbox's job
            self._template = env.from_string(self.source) if self.trusted else env.parse(self.source)
        except TemplateError as e:
            raise ChatTemplateError(f"chat template {self.name} does not parse: {e}") from None
        except RecursionError:
            raise ChatTemplateError(f"chat template {self.name} does not parse: it nests too deeply") from None

    def render(self, messages: list, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`, ending with the assistant's header when asked."""
        return self.render_many([(messages, add_generation_prompt)])[0]

    def render_many(self, conversations: list[tuple[list, bool]]) -> list[str]:
        """`render` for each (messages, add_generation_prompt): one trip to the sandbox for all.

        Raises:
            ChatTemplateError: bad messages, or a template that fails, raises, or runs over the
                sandbox's budget of time, memory or length.
        """
        renders = [{"messages": check_messages(m), "add_generation_prompt": g, "bos_token": self.bos_token,
                    "eos_token": self.eos_token} for m, g in conversations]
        if not self.trusted:
            try:
                return SANDBOX.render(self.source, renders)
            except RenderError as e:
                raise ChatTemplateError(f"chat template {self.name}: {e}") from None
        try:
            return [self._template.render(**r) for r in renders]
        except ChatTemplateError:
            raise
        except Exception as e:  # SecurityError, UndefinedError, TypeError from the template's own code
            raise ChatTemplateError(f"chat template {self.name} failed to render: {e}") from None


def encode_chat(template: ChatTemplate, tokenizer, messages: list, *, add_eos: bool = True,
                source: str = "messages") -> tuple[list[int], list[bool]]:
    """Token ids of a conversation for instruction tuning, and a loss mask true exactly on what the
    assistant says: each assistant turn's text through the template's end-of-turn marker, plus the
    EOS token appended after the last turn (so the model learns to stop).

    The conversation is rendered in pieces: before assistant turn i comes `render(messages[:i],
    add_generation_prompt=True)`, and the turn is what `render(messages[:i + 1])` adds to that.
    Each piece is tokenized on its own, as generation sees a prompt and then its continuation.
    Messages after the last assistant turn teach nothing and are left out.

    Raises:
        ChatTemplateError: no assistant turn, an empty one, or one that opens the conversation, or a
            template whose rendering of a conversation does not extend its rendering of the beginning.
    """
    messages = check_messages(messages, source)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ChatTemplateError(f"{source}: no assistant turn to learn from")
    ids: list[int] = []
    mask: list[bool] = []
    done = ""  # the text covered so far
    for i in turns:
        if i == 0:
            raise ChatTemplateError(f"{source}[0]: the conversation opens with an assistant turn; it needs a prompt")
        if not messages[i]["content"].strip():
            raise ChatTemplateError(f"{source}[{i}]: empty assistant turn")
    texts = iter(template.render_many([(messages[:i + end], end == 0) for i in turns for end in (0, 1)]))
    for i in turns:
        prompt, full = next(texts), next(texts)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ChatTemplateError(f"chat template {template.name!r} renders {source}[:{i + 1}] as text that does "
                                    "not extend the rendering of the earlier turns; cannot tell the assistant's "
                                    "tokens apart")
        answer = full[len(prompt):]
        end = answer.rfind(template.stop) if template.stop else -1
        if end >= 0:  # the turn ends with its marker; what follows (a newline) opens the next prompt
            answer = answer[:end + len(template.stop)]
        for text, trained in ((prompt[len(done):], False), (answer, True)):
            piece = tokenizer.encode(text) if text else []
            ids += piece
            mask += [trained] * len(piece)
        done = prompt + answer
    eos = tokenizer.eos_id
    if add_eos and eos is not None and ids[-1] != eos:
        ids.append(eos)
        mask.append(True)
    return ids, mask


def builtin_template(name: str, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
    if name not in TEMPLATES:
        raise ChatTemplateError(f"unknown chat template {name!r}; built in: {', '.join(TEMPLATES)}")
    source, stop = TEMPLATES[name]
    return ChatTemplate(source, stop, bos_token, eos_token, name, trusted=True)


def load_chat_template(folder: str | os.PathLike | None, name: str | None = None) -> ChatTemplate:
    """The chat template for a checkpoint folder.

    `name` picks a built-in template or a Jinja file. Otherwise the folder's `chat_template.jinja`
    or tokenizer_config.json `chat_template` is used when it has one (its eos_token ends a turn),
    else llmlab's own.
    """
    config = {}
    file = Path(folder) / "tokenizer_config.json" if folder is not None else None
    if file is not None and file.is_file():
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise ChatTemplateError(f"{file}: not a readable JSON file: {e or 'nested too deeply'}") from None
        if not isinstance(config, dict):
            raise ChatTemplateError(f"{file}: expected a JSON object, got {type(config).__name__}")
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    if name is not None:
        if name in TEMPLATES:
            return builtin_template(name, bos, eos)
        path = Path(name)
        if not os.path.lexists(path):
            raise ChatTemplateError(f"chat template {name!r} is neither a built-in ({', '.join(TEMPLATES)}) "
                                    "nor a file")
        return ChatTemplate(_read_text(path), eos or "<|end|>", bos, eos, str(path))
    source, origin = config.get("chat_template"), file
    jinja_file = Path(folder) / "chat_template.jinja" if folder is not None else None
    if jinja_file is not None and jinja_file.is_file():
        source, origin = _read_text(jinja_file), jinja_file
    if isinstance(source, list):  # a list of named templates: take the default one
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(source, str) and source:
        return ChatTemplate(source, eos or "<|end|>", bos, eos, str(origin))
    return builtin_template("llmlab", bos, eos)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ChatTemplateError(f"chat template {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ChatTemplateError(f"chat template {path}: cannot read it: {e.strerror or e}") from None


def _token_text(token) -> str:
    # tokenizer_config.json stores special tokens as strings or as {"content": ...} objects
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return token if isinstance(token, str) else ""
