"""Text in, text out: the engine plus a tokenizer, stop strings, streaming deltas and chat.

Stop strings are matched on the decoded text of each completion, wherever they fall inside a
token (a "." stop ends at a ")." token too); only a stop string that is a whole special token
(<|end|>) is matched on its id, since no other token can hold its text. The returned text ends
before the first match (the OpenAI API's convention) and a stop token is never part of the text;
nor is any other special token (vLLM's `skip_special_tokens` default). The stream holds back text that could still become a stop string or is an incomplete UTF-8
character, so what it has yielded is never taken back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from torch import nn

from llmlab.generate.engine import Completion, Engine
from llmlab.generate.sampling import GenerationError, SamplingParams
from llmlab.tokenizer.bpe import Tokenizer
from llmlab.tokenizer.chat import ChatTemplate, check_messages


@dataclass
class TextCompletion:
    text: str
    token_ids: list[int]  # generated tokens, a final stop token included
    finish_reason: str  # "stop" or "length"
    prompt_index: int = 0
    sample_index: int = 0
    prompt_tokens: int = 0
    logprobs: list[float] | None = None
    top_logprobs: list[list[dict]] | None = None  # per token: [{"id", "token", "logprob"}], most likely first
    score: float | None = None  # beam search only


@dataclass
class TextDelta:
    text: str  # new text since the previous delta
    finish_reason: str | None = None  # set on the last delta


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters of `text` must wait: an unfinished UTF-8 character (decoded as
    U+FFFD) or a suffix that is the start of a stop string."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


def split_stops(tokenizer: Tokenizer, stop: Sequence[str], stop_token_ids: Sequence[int] = ()
                ) -> tuple[tuple[int, ...], list[str]]:
    """(stop token ids, stop strings): EOS joins the stop tokens, and a stop string that is one special
    token becomes a stop token. Every other stop string is matched on the decoded text, even one that
    is a single ordinary token ("."), since a longer token (").") may hold it."""
    stop_ids, stop_text = list(stop_token_ids), []
    for s in stop:
        if not s:
            raise GenerationError("a stop string must not be empty")
        token = tokenizer.special_token_id(s)
        if token is not None:
            stop_ids.append(token)
        else:
            stop_text.append(s)
    if tokenizer.eos_id is not None:
        stop_ids.append(tokenizer.eos_id)
    return tuple(dict.fromkeys(stop_ids)), stop_text


def stop_string_check(tokenizer: Tokenizer, stop: Sequence[str]) -> Callable[[list[int]], bool] | None:
    """check(generated token ids) -> True once the decoded text holds a stop string; None without any.

    Only the newest tokens are decoded: a new match ends in the newest token, and 4 bytes per
    character (plus a margin for a character split across tokens) cover the longest stop string.
    """
    if not stop:
        return None
    stop, decode = list(stop), tokenizer.decode
    window = 4 * max(len(s) for s in stop) + 8

    def check(tokens: list[int]) -> bool:
        return _first_stop(decode(tokens[-window:], skip_special=True), stop) is not None

    return check


class IncrementalText:
    """The text of a completion as its tokens arrive, released in deltas that never split a UTF-8
    character or show the start of a stop string that may still complete; the text is cut before
    the first stop string, and a final stop token is not shown."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], stop_token_ids: Sequence[int]):
        self.tokenizer, self.stop, self.stop_token_ids = tokenizer, list(stop), set(stop_token_ids)
        self.tokens: list[int] = []
        self.text = ""  # everything released so far
        self.finished = False

    def push(self, token_id: int, finish_reason: str | None) -> TextDelta | None:
        """Add a token (finish_reason set on the last one); returns the new text, if any is safe to show."""
        self.tokens.append(token_id)
        finished = finish_reason is not None
        body = self.tokens[:-1] if finished and token_id in self.stop_token_ids else self.tokens
        text = self.tokenizer.decode(body, skip_special=True)
        cut = _first_stop(text, self.stop)
        if cut is not None:
            text, finished = text[:cut], True
        end = len(text) if finished else len(text) - _held_back(text, self.stop)
        self.finished = finished
        if end > len(self.text) or finished:
            delta = TextDelta(text[len(self.text):end], (finish_reason or "stop") if finished else None)
            self.text = text[:end]
            return delta
        return None


class TextGenerator:
    """Generation from text prompts with a model and its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, *, add_bos: bool = False, compile: bool = False):
        self.engine = Engine(model, compile=compile)
        self.tokenizer = tokenizer
        self.add_bos = add_bos and tokenizer.bos_id is not None
        # an encoder-decoder's input ends with EOS, as T5's tokenizer frames it and task fine-tuning trains
        self.add_eos = self.engine.encoder_decoder and tokenizer.eos_id is not None

    @property
    def context(self) -> int:
        return self.engine.context

    @property
    def output_limit(self) -> tuple[int, str]:
        """(the most tokens one completion may have, what sets it)."""
        if self.engine.encoder_decoder:
            return int(self.engine.model.config.max_target_len), "the decoder's limit (max_target_len)"
        return self.context, "the model's context window"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=self.add_bos, eos=self.add_eos)

    def _params(self, params: SamplingParams, stop: Sequence[str]) -> tuple[SamplingParams, list[str]]:
        stop_ids, stop_text = split_stops(self.tokenizer, stop, params.stop_token_ids)
        return replace(params, stop_token_ids=stop_ids), stop_text

    def _finish(self, c: Completion, params: SamplingParams, stop: list[str], prompt_tokens: int) -> TextCompletion:
        ids = c.token_ids
        body = ids[:-1] if c.finish_reason == "stop" and ids and ids[-1] in params.stop_token_ids else ids
        text = self.tokenizer.decode(body, skip_special=True)
        cut = _first_stop(text, stop)
        top = None
        if c.top_logprobs is not None:
            top = [[{"id": t, "token": self.tokenizer.decode([t]), "logprob": v} for t, v in (d or {}).items()]
                   for d in c.top_logprobs]
        return TextCompletion(text if cut is None else text[:cut], ids, c.finish_reason or "length",
                              c.prompt_index, c.sample_index, prompt_tokens, c.logprobs, top, c.score)

    def complete(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams, *, stop: Sequence[str] = (),
                 truncate: bool = False) -> list[TextCompletion]:
        """n completions per prompt (text, or token ids taken as they are), prompt by prompt."""
        params, stop_text = self._params(params, stop)
        ids = [self.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        check = self._stop_check(stop_text)
        out = self.engine.generate(ids, params, stop_check=check, truncate=truncate)
        return [self._finish(c, params, stop_text, len(ids[c.prompt_index])) for c in out]

    def stream(self, prompt: str | list[int], params: SamplingParams, *, stop: Sequence[str] = (),
               truncate: bool = False) -> Iterator[TextDelta]:
        """Text deltas of one completion as it is generated (n must be 1)."""
        if params.n != 1 or params.num_beams != 1:
            raise GenerationError("streaming gives one completion: n and num_beams must be 1")
        params, stop_text = self._params(params, stop)
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        text = IncrementalText(self.tokenizer, stop_text, params.stop_token_ids)
        for events in self.engine.stream([ids], params, stop_check=self._stop_check(stop_text), truncate=truncate):
            delta = text.push(events[0].token_id, events[0].finish_reason)
            if delta is not None:
                yield delta
            if text.finished:
                return

    def _stop_check(self, stop: list[str]):
        check = stop_string_check(self.tokenizer, stop)
        return None if check is None else lambda _row, tokens: check(tokens)


class ChatSession:
    """A conversation: the history, rendered with a chat template and trimmed to the context window."""

    def __init__(self, generator: TextGenerator, template: ChatTemplate, params: SamplingParams, *,
                 system: str | None = None, stop: Sequence[str] = ()):
        self.generator, self.template, self.params = generator, template, params
        self.stop = [template.stop, *stop]  # the end of an assistant turn, and the caller's own
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]

    def prompt_ids(self, messages: list[dict[str, str]]) -> tuple[list[int], int]:
        """Token ids of the rendered conversation and how many earlier turns were dropped to fit.

        The oldest user/assistant turns go first; system messages and the newest message stay. The
        prompt must leave room for max_new_tokens, or at least one token when only the newest message
        is left.
        """
        messages = check_messages(messages)
        system = [m for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        context, want = self.generator.context, self.params.max_new_tokens
        dropped = 0
        while True:
            ids = self.generator.encode(self.template.render(system + turns, add_generation_prompt=True))
            if len(ids) + want <= context or len(turns) <= 1:
                break
            turns = turns[1:]
            dropped += 1
        if len(ids) >= context:
            raise GenerationError(f"the conversation needs {len(ids)} tokens even with only the newest message, "
                                  f"but the context window is {context}")
        return ids, dropped

    def send(self, content: str) -> Iterator[TextDelta]:
        """Add a user message and stream the assistant's reply, which joins the history at the end."""
        self.messages.append({"role": "user", "content": content})
        ids, _ = self.prompt_ids(self.messages)
        reply = []
        for delta in self.generator.stream(ids, self.params, stop=self.stop):
            reply.append(delta.text)
            yield delta
        self.messages.append({"role": "assistant", "content": "".join(reply)})
