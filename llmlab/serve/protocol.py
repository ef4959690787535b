"""The OpenAI API's request fields, checked: every bad value becomes an `ApiError` that names the
field and what was expected, answered with a 4xx in OpenAI's error shape, never a 500.

Bounds follow the OpenAI API reference: temperature in [0, 2], penalties in [-2, 2], at most 4
stop strings, completions `logprobs` up to 5, chat `top_logprobs` up to 20, `logit_bias` values in
[-100, 100]; the server's own limits (`Limits`) cap `n`, `max_tokens`, the prompt length and how
deeply a body nests. A field llmlab does not implement is refused by name, never ignored: `best_of`,
`suffix`, tools and `response_format` are accepted only at the value that asks for nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmlab.generate.sampling import SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    context: int  # the model's context window, in tokens (an encoder-decoder's: its input's)
    max_tokens: int  # the most tokens one completion may ask for
    max_n: int = 16  # completions per prompt
    max_prompts: int = 64  # prompts in one completions request
    max_stop: int = 4  # stop strings per request
    max_stop_chars: int = 200  # characters in one stop string
    max_messages: int = 512  # messages in one chat request
    max_body_bytes: int = 4 << 20  # request body size
    max_depth: int = 512  # how deeply lists and objects may nest in a body
    vocab_size: int | None = None  # token ids (prompts, logit_bias) must be below this
    encoder_decoder: bool = False  # the prompt (the encoder's input) and the completion do not share the context

    def room(self, prompt_tokens: int) -> int:
        """The most tokens a completion of a `prompt_tokens`-token prompt may have (at most max_tokens)."""
        return self.max_tokens if self.encoder_decoder else min(self.max_tokens, self.context - prompt_tokens)


# what each route reads; beside them, `user` and OpenAI's bookkeeping fields are accepted and change nothing
SAMPLING_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
                             "presence_penalty", "frequency_penalty", "seed", "logit_bias", "logprobs",
                             "top_k", "min_p", "repetition_penalty"})  # the last three are vLLM's extensions
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "echo"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
# vLLM's tokenizer routes, which lm-eval's remote tokenizer calls
TOKENIZE_FIELDS = frozenset({"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                             "return_token_strs"})
DETOKENIZE_FIELDS = frozenset({"model", "tokens"})
BOOKKEEPING = frozenset({"user", "store", "metadata", "service_tier", "parallel_tool_calls"})
# not implemented: accepted only at the values that ask for nothing
UNUSED = {"best_of": (None, 1), "suffix": (None, ""), "tools": (None, []), "functions": (None, []),
          "tool_choice": (None, "none"), "function_call": (None, "none"), "response_format": (None, {"type": "text"})}
MAX_LOGIT_BIAS = 1024  # entries in one logit_bias


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def check_depth(value, limit: int) -> None:
    """Refuse a body whose lists and objects nest deeper than `limit` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    raise bad(f"request body nests lists and objects deeper than {limit} levels")
                stack.append((child, depth + 1))


def check_fields(body: dict, allowed: frozenset[str]) -> None:
    """Refuse a field this route does not read, naming it; see UNUSED and BOOKKEEPING."""
    for name, value in body.items():
        if name in allowed or name in BOOKKEEPING:
            continue
        if name in UNUSED:
            if any(value == v and type(value) is type(v) for v in UNUSED[name]):
                continue
            raise bad(f"{name}: not supported by llmlab's server (leave it out, or send {UNUSED[name][1]!r})", name)
        raise bad(f"Unrecognized request argument supplied: {name}", name)


def check_model(body: dict, served_name: str) -> None:
    name = body.get("model")
    if name is None:
        return
    if not isinstance(name, str):
        raise bad(f"model: expected a string, got {type(name).__name__}", "model")
    if name != served_name:
        raise ApiError(404, f"The model '{name[:200]}' does not exist; this server has '{served_name}'",
                       type="not_found_error", param="model", code="model_not_found")


def logit_bias(body: dict, vocab_size: int | None) -> dict[int, float]:
    """`logit_bias`: {"token id": bias in [-100, 100]}, added to the logits before sampling."""
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad("logit_bias: expected an object mapping token ids to biases in [-100, 100]", "logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise bad(f"logit_bias: at most {MAX_LOGIT_BIAS} tokens, got {len(value)}", "logit_bias")
    out = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 18):
            raise bad(f"logit_bias: keys are token ids (non-negative integers), got {key[:50]!r}", "logit_bias")
        token = int(key)
        if vocab_size is not None and token >= vocab_size:
            raise bad(f"logit_bias: token id {token} is outside the vocabulary [0, {vocab_size})", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias) \
                or not -100 <= bias <= 100:
            raise bad(f"logit_bias[{key!r}]: expected a number in [-100, 100], got {bias!r}", "logit_bias")
        out[token] = float(bias)
    return out


def _number(body: dict, name: str, default, lo: float, hi: float, *, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise bad(f"{name}: expected {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not lo <= value <= hi:
        raise bad(f"{name}: {value} is out of range [{lo}, {hi}]", name)
    return value


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{name}: expected true or false, got {value!r}", name)
    return value


def stop_strings(body: dict, limits: Limits) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("stop: expected a string or a list of strings", "stop")
    if len(stop) > limits.max_stop:
        raise bad(f"stop: at most {limits.max_stop} stop strings, got {len(stop)}", "stop")
    for s in stop:
        if not s:
            raise bad("stop: a stop string must not be empty", "stop")
        if len(s) > limits.max_stop_chars:
            raise bad(f"stop: a stop string is limited to {limits.max_stop_chars} characters", "stop")
    return stop


@dataclass
class Common:
    """What completions and chat completions share."""

    params: SamplingParams
    n: int
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    logprobs: int | None  # None = off; k = the chosen token and the top k
    max_tokens: int
    max_tokens_given: bool  # False: chat completions may fill the context


def common_fields(body: dict, limits: Limits, *, max_tokens_names: tuple[str, ...], default_max_tokens: int,
                  min_max_tokens: int = 1) -> Common:
    max_tokens, user = default_max_tokens, False
    for name in max_tokens_names:
        if body.get(name) is not None:
            max_tokens = _number(body, name, default_max_tokens, min_max_tokens, limits.max_tokens, integer=True)
            user = True
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p: must be in (0, 1]", "top_p")
    n = _number(body, "n", 1, 1, limits.max_n, integer=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise bad(f"seed: expected a non-negative integer, got {seed!r}", "seed")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise bad("stream_options: expected an object, and only with stream=true", "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    if options and not isinstance(options.get("include_usage", False), bool):
        raise bad(f"stream_options: include_usage must be true or false, got {options['include_usage']!r}",
                  "stream_options")
    if options and set(options) - {"include_usage"}:
        name = sorted(set(options) - {"include_usage"})[0]
        raise bad(f"stream_options: unknown option {name[:50]!r}; llmlab reads include_usage", "stream_options")
    params = SamplingParams(
        max_new_tokens=max(1, max_tokens), temperature=temperature, top_p=top_p,
        top_k=_number(body, "top_k", 0, 0, 1 << 20, integer=True),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10.0),
        logit_bias=logit_bias(body, limits.vocab_size))
    return Common(params, n, stop_strings(body, limits), seed, stream, include_usage, None, max_tokens, user)


def completion_prompts(body: dict, limits: Limits, vocab_size: int) -> list[str | list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of token-id lists."""
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt: required", "prompt")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list):
        prompts = prompt
    else:
        raise bad("prompt: expected a string, a list of strings, a list of token ids or a list of such lists",
                  "prompt")
    if not prompts:
        raise bad("prompt: the list is empty", "prompt")
    if len(prompts) > limits.max_prompts:
        raise bad(f"prompt: at most {limits.max_prompts} prompts per request, got {len(prompts)}", "prompt")
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise bad(f"prompt[{i}]: empty prompt", "prompt")
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            out = [t for t in p if not 0 <= t < vocab_size]
            if out:
                raise bad(f"prompt[{i}]: token id {out[0]} is outside the vocabulary [0, {vocab_size})", "prompt")
        else:
            raise bad(f"prompt[{i}]: expected a non-empty string or a non-empty list of token ids", "prompt")
    return prompts


def context_check(prompt_tokens: int, max_tokens: int, limits: Limits, param: str = "prompt") -> None:
    """OpenAI's wording, which clients match to detect an over-long request. An encoder-decoder's prompt
    has the context to itself (its completion's own limit bounds max_tokens already)."""
    if limits.encoder_decoder:
        if prompt_tokens > limits.context:
            raise bad(f"This model's maximum context length is {limits.context} tokens for the prompt (the "
                      f"encoder's input). However, you requested {prompt_tokens} tokens in the prompt. Please "
                      "reduce the prompt length.", param, "context_length_exceeded")
        return
    if prompt_tokens + max_tokens > limits.context:
        raise bad(f"This model's maximum context length is {limits.context} tokens. However, you requested "
                  f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                  "completion). Please reduce the prompt or the completion length.",
                  param, "context_length_exceeded")


@dataclass
class TokenizeRequest:
    """`POST /tokenize`: a text prompt, or chat messages to render with the served template first."""

    prompt: str | None
    messages: list | None
    add_special_tokens: bool  # add what the server adds to a prompt (BOS when the model takes one)
    add_generation_prompt: bool  # end rendered messages with the assistant's header
    return_token_strs: bool  # also return each token's vocabulary entry


def tokenize_request(body: dict, limits: Limits) -> TokenizeRequest:
    """vLLM's tokenize request: {"prompt": str} or {"messages": [...]}, with `add_special_tokens`
    (default true), `add_generation_prompt` (messages only, default true) and `return_token_strs`."""
    check_fields(body, TOKENIZE_FIELDS)
    prompt, messages = body.get("prompt"), body.get("messages")
    if prompt is not None and messages is not None:
        raise bad("prompt: give either prompt or messages, not both", "prompt")
    if prompt is None and messages is None:
        raise bad("prompt: required (a string), or messages (a list of chat messages)", "prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise bad(f"prompt: expected a string, got {type(prompt).__name__}", "prompt")
    if messages is not None:
        if not isinstance(messages, list):
            raise bad(f"messages: expected a list of messages, got {type(messages).__name__}", "messages")
        if len(messages) > limits.max_messages:
            raise bad(f"messages: at most {limits.max_messages} messages", "messages")
    elif body.get("add_generation_prompt") is not None:
        raise bad("add_generation_prompt: applies to messages only", "add_generation_prompt")
    return TokenizeRequest(prompt, messages, _bool(body, "add_special_tokens", True),
                           _bool(body, "add_generation_prompt", True), _bool(body, "return_token_strs"))


def detokenize_tokens(body: dict, vocab_size: int) -> list[int]:
    """vLLM's detokenize request: {"tokens": [token ids]}, each in [0, vocab_size)."""
    check_fields(body, DETOKENIZE_FIELDS)
    tokens = body.get("tokens")
    if tokens is None:
        raise bad("tokens: required (a list of token ids)", "tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad("tokens: expected a list of token ids (integers)", "tokens")
    out = [t for t in tokens if not 0 <= t < vocab_size]
    if out:
        raise bad(f"tokens: token id {out[0]} is outside the vocabulary [0, {vocab_size})", "tokens")
    return tokens
