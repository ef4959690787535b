"""What the evaluator asks of a model: three requests, with lm-evaluation-harness's semantics.

- `loglikelihood([(context, continuation)])` -> [(log p(continuation | context), is_greedy)]
- `loglikelihood_rolling([text])` -> [log p(text)], the whole text scored in windows of the context
- `generate_until([(context, gen_kwargs)])` -> [text], greedy or sampled until a stop string

`LocalLM` answers them with an llmlab model in this process; `ServerLM` with any OpenAI-compatible
completions endpoint (`llmlab serve`, vLLM, ...). Both tokenize as the harness does, so a task
gets the same scores here as under `lm_eval --model hf`:

- a context's trailing whitespace moves to the continuation, and the continuation's tokens are
  those of `encode(context + continuation)` after the first `len(encode(context))`;
- nothing is added before a context; an empty context is the document-start token (the token that
  precedes every document in training: BOS when the tokenizer declares one, else EOS);
- a text longer than the context is scored in disjoint windows, each token predicted once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from llmlab.common import LlmlabError
from llmlab.generate.engine import Score, context_length, score_continuations
from llmlab.generate.sampling import SamplingParams
from llmlab.generate.scheduler import make_scheduler
from llmlab.generate.scheduler import Sequence as Running
from llmlab.generate.text import stop_string_check

DEFAULT_MAX_GEN_TOKS = 256  # lm-evaluation-harness's default for generate_until
MAX_ANSWER = 64 << 20  # bytes of one server answer
TOKEN_BUDGET = 16384  # tokens of context and continuation scored in one batch


class EvalError(LlmlabError):
    """A model or a request the evaluator cannot use; the message says why."""


def model_hash(folder: Path) -> str:
    """SHA-256 (first 16 hex digits) of a checkpoint's config.json and weight files, in name order."""
    digest = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin"):
            digest.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, targets) windows that predict every token of `tokens` exactly once with inputs of at
    most `max_len` tokens: the first window predicts the first max_len tokens from `prefix`; each
    further one the next max_len from the one token before them, except that the last, shorter
    window keeps as much earlier text as fits (lm-evaluation-harness's disjoint rolling windows with
    a context of one token)."""
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        inputs = tokens[max(0, end - max_len - 1):end - 1]
        windows.append((inputs[:len(inputs) - (n - 1)], tokens[end - n:end]))
        done = end
    return windows


def fit_pairs(pairs: Sequence[tuple[list[int], list[int]]], max_len: int
              ) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """(context, continuation) pairs that fit a context of `max_len`, and the pair each came from: a
    pair whose continuation alone is longer than that is scored in rolling windows, the first
    conditioned on the context's last token; a longer context keeps its newest tokens (as the
    harness truncates)."""
    out, owner = [], []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise EvalError("a continuation encodes to no tokens; it cannot be scored")
        if len(cont) > max_len:
            windows = rolling_windows(cont, ctx[-1], max_len)
        elif len(ctx) + len(cont) > max_len + 1:
            windows = [((list(ctx) + list(cont))[-(max_len + 1):][:-len(cont)], cont)]
        else:
            windows = [(ctx, cont)]
        out += windows
        owner += [i] * len(windows)
    return out, owner


def score_pairs(pairs: Sequence[tuple[list[int], list[int]]], max_len: int,
                score: Callable[[list[tuple[list[int], list[int]]]], list[Score]]) -> list[Score]:
    """`score` (which takes pairs that fit the context) applied to any pairs: fitted by `fit_pairs`,
    and the windows of one pair summed back into one score."""
    fitted, owner = fit_pairs(pairs, max_len)
    return sum_scores(len(pairs), owner, score(fitted))


def sum_scores(n: int, owner: Sequence[int], scores: Sequence[Score]) -> list[Score]:
    """The scores of the pieces of n pairs (piece k belongs to pair owner[k]) summed back per pair."""
    out: list = [None] * n
    for i, s in zip(owner, scores):
        out[i] = s if out[i] is None else Score(out[i].logprob + s.logprob, out[i].greedy and s.greedy,
                                                out[i].token_logprobs + s.token_logprobs)
    return out


def encode_pair(encode: Callable[[str], list[int]], prefix_id: int, context: str, continuation: str
                ) -> tuple[list[int], list[int]]:
    """The harness's tokens of a (context, continuation) request: trailing whitespace of the context
    moves to the continuation, whose tokens are those of the whole text after the context's; an
    empty context is the document-start token."""
    if context == "":
        cont = encode(continuation)
        return ([prefix_id], cont) if not cont or cont[0] != prefix_id else (cont[:1], cont[1:])
    context, continuation = move_whitespace(context, continuation)
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


def move_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """(context, continuation) with the context's trailing whitespace moved to the continuation, as the
    harness splits a request before tokenizing it."""
    n = len(context) - len(context.rstrip())
    return context[:len(context) - n], context[len(context) - n:] + continuation


def rolling_loglikelihood(lm, texts: Sequence[str]) -> list[float]:
    """Total log-likelihood of each text, scored in `rolling_windows` by `lm.score_tokens`."""
    windows, owner = [], []
    for i, text in enumerate(texts):
        for w in rolling_windows(lm.encode(text), lm.prefix_id, lm.max_length):
            windows.append(w)
            owner.append(i)
    totals = [0.0] * len(texts)
    for i, s in zip(owner, lm.score_tokens(windows)):
        totals[i] += s.logprob
    return totals


def generation_settings(kwargs: dict, where: str) -> tuple[list[str], int, float]:
    """(stop strings, max new tokens, temperature) from lm-evaluation-harness's gen_kwargs."""
    known = {"until", "max_gen_toks", "max_tokens", "do_sample", "temperature"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise EvalError(f"{where}: generation_kwargs {unknown} are not supported (llmlab knows {sorted(known)})")
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, list) or not all(isinstance(s, str) for s in until):
        raise EvalError(f"{where}: generation_kwargs.until must be a string or a list of strings, got {until!r}")
    max_new = kwargs.get("max_gen_toks", kwargs.get("max_tokens", DEFAULT_MAX_GEN_TOKS))
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise EvalError(f"{where}: generation_kwargs.max_gen_toks must be an integer >= 1, got {max_new!r}")
    temperature = kwargs.get("temperature", 0.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 100:
        raise EvalError(f"{where}: generation_kwargs.temperature must be a number in [0, 100], got {temperature!r}")
    if not isinstance(kwargs.get("do_sample", False), bool):
        raise EvalError(f"{where}: generation_kwargs.do_sample must be true or false, got {kwargs['do_sample']!r}")
    if not kwargs.get("do_sample", False):
        temperature = 0.0
    return [s for s in until if s], max_new, float(temperature)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop string (the harness splits on each in turn: the same)."""
    for s in stops:
        text = text.split(s)[0]
    return text


class LocalLM:
    """An llmlab decoder and its tokenizer, answering the evaluator's requests in batches;
    `from_path` gives the class of the checkpoint's kind (`llmlab.eval.encoders`)."""

    kind = "decoder"

    def __init__(self, model: nn.Module, tokenizer, *, batch_size: int = 32, name: str = "model",
                 hash: str | None = None, seed: int = 1234, template=None):
        self.model, self.tokenizer, self.template = model.eval(), tokenizer, template
        self.batch_size, self.name, self.hash, self.seed = batch_size, name, hash, seed
        self.max_length = context_length(model)
        start = getattr(tokenizer, "document_start_id", None)
        self.prefix_id = start if start is not None else (
            tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id)
        if self.prefix_id is None:
            raise EvalError("the tokenizer has neither a BOS nor an EOS token to start a document with")

    @classmethod
    def from_path(cls, path: str | os.PathLike, *, device: str = "cpu", dtype: str = "auto",
                  batch_size: int = 32, seed: int = 1234) -> LocalLM:
        """The model a checkpoint, run directory or HF folder holds: a decoder as a LocalLM, an
        encoder-decoder as a Seq2SeqLM, an encoder as an EncoderLM."""
        from llmlab.common import choose_device, choose_dtype
        from llmlab.eval.encoders import EncoderLM, Seq2SeqLM, model_framing, model_labels
        from llmlab.models import model_kind
        from llmlab.models.io import load_model, read_config, resolve_model_dir
        from llmlab.tokenizer import load_tokenizer
        from llmlab.tokenizer.chat import load_chat_template

        folder = resolve_model_dir(path)
        dev = choose_device(device, "device")
        torch_dtype = None if dtype in ("auto", "float32", "fp32") else choose_dtype(dtype, dev, "dtype")
        cfg = read_config(folder)[0]
        kind = model_kind(cfg)
        if kind == "decoder" and getattr(cfg, "num_labels", 0):
            raise EvalError(f"{path}: a reward model or classifier (a score head), not a language model")
        if not (folder / "tokenizer.json").is_file():
            raise EvalError(f"{path}: has no tokenizer.json beside the model")
        model = load_model(folder, dev, dtype=torch_dtype)
        tokenizer = load_tokenizer(folder)
        common = {"batch_size": batch_size, "name": str(path), "hash": model_hash(folder), "seed": seed}
        if kind == "encoder":
            labels = model_labels(folder) if cfg.head in ("classify", "tokens") else None
            if labels is not None and len(labels) != cfg.num_labels:
                raise EvalError(f"{folder / 'labels.json'}: lists {len(labels)} labels; the model has "
                                f"{cfg.num_labels}")
            framing = model_framing(folder, cfg.max_seq_len) if cfg.head != "mlm" else None
            return EncoderLM(model, tokenizer, labels=labels, framing=framing, **common)
        lm = Seq2SeqLM if kind == "encoder-decoder" else cls
        return lm(model, tokenizer, template=load_chat_template(folder), **common)

    # ------------------------------------------------------------------ chat

    def _template(self):
        if self.template is None:
            from llmlab.tokenizer.chat import builtin_template

            self.template = builtin_template("llmlab")
        return self.template

    def chat_prompt(self, messages: list[dict]) -> str:
        """The conversation rendered with the checkpoint's chat template, ready for the reply."""
        return self._template().render(messages, add_generation_prompt=True)

    @property
    def chat_stop(self) -> str:
        return self._template().stop

    # ------------------------------------------------------------------ tokenization

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    # ------------------------------------------------------------------ requests

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.encode, self.prefix_id, c, x) for c, x in requests]
        return [(s.logprob, s.greedy) for s in self.score_tokens(pairs)]

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        return rolling_loglikelihood(self, texts)

    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[Score]:
        """Scores of token-id (context, continuation) pairs, in order (`fit_pairs` fits each to the
        context window). Pairs with the same context share its prefill."""
        return score_pairs(pairs, self.max_length, self._score)

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[Score]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            groups.setdefault(tuple(ctx), []).append(i)
        order = sorted(groups, key=lambda c: -(len(c) + max(len(pairs[i][1]) for i in groups[c])))
        out: list = [None] * len(pairs)
        batch: list[tuple[int, ...]] = []
        cost = 0
        for ctx in order + [None]:
            if ctx is not None:
                width = len(ctx) + max(len(pairs[i][1]) for i in groups[ctx])
                rows = len(groups[ctx])
            if batch and (ctx is None or len(batch) >= self.batch_size or cost + width * rows > TOKEN_BUDGET):
                scored = score_continuations(self.model, [(list(c), [pairs[i][1] for i in groups[c]]) for c in batch])
                for c, scores in zip(batch, scored):
                    for i, s in zip(groups[c], scores):
                        out[i] = s
                batch, cost = [], 0
            if ctx is not None:
                batch.append(ctx)
                cost += width * rows
        return out

    @property
    def generation_room(self) -> int:
        """The most tokens one completion may have: what the context leaves after one prompt token."""
        return self.max_length - 1

    def prompt_ids(self, context: str, max_new: int) -> list[int]:
        """A generation prompt: the context's newest tokens that leave room for max_new tokens."""
        return self.encode(context)[-(self.max_length - max_new):] or [self.prefix_id]

    def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        """Completions through the continuous-batching scheduler: each stops at its first stop string,
        EOS or max_gen_toks, and its prompt keeps its newest tokens when it does not fit."""
        sched = make_scheduler(self.model, max_batch=self.batch_size)
        eos = self.tokenizer.eos_id
        running = []
        for i, (context, kwargs) in enumerate(requests):
            stops, max_new, temperature = generation_settings(kwargs, f"request {i}")
            max_new = min(max_new, self.generation_room)
            ids = self.prompt_ids(context, max_new)
            params = SamplingParams(max_new_tokens=max_new, temperature=temperature,
                                    stop_token_ids=(eos,) if eos is not None else ())
            check = stop_string_check(self.tokenizer, stops)
            running.append((sched.add(Running(ids, params, seed=self.seed + i, stop_check=check)), stops))
        while sched.busy:
            sched.step()
        texts = []
        for seq, stops in running:
            out = seq.output[:-1] if seq.output and seq.output[-1] == eos else seq.output
            texts.append(cut_at_stops(self.tokenizer.decode(out, skip_special=True), stops))
        return texts


@contextlib.contextmanager
def _expecting(url: str, what: str):
    """A server answer of the wrong shape is an EvalError naming the route and what was expected."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise EvalError(f"{url}: unexpected answer ({type(e).__name__}: {e}); expected {what}") from None


def _logprobs(values, n: int) -> list[float]:
    """Log-probabilities from a server: n of them, each a finite number <= 0."""
    if len(values) != n:
        raise ValueError(f"{len(values)} log-probabilities where {n} were expected")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > 1e-4:
            raise ValueError(f"a log-probability must be a finite number <= 0, got {v!r}")
    return [float(v) for v in values]


class ServerLM:
    """Any OpenAI-compatible completions endpoint. Log-likelihoods come from `echo` with `logprobs`;
    with the server's `/tokenize` route (llmlab serve, vLLM) prompts are sent as token ids split as
    `LocalLM` splits them, otherwise as text, the continuation found by its character offset."""

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 batch_size: int = 16, timeout: float = 60.0, seed: int = 1234):
        if not base_url.startswith(("http://", "https://")):
            raise EvalError(f"--server {base_url}: expected an http:// or https:// URL, such as "
                            "http://127.0.0.1:8000/v1")
        self.root = base_url.rstrip("/").removesuffix("/completions").removesuffix("/v1")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.batch_size, self.timeout, self.seed = batch_size, timeout, seed
        self.model_id = model or self._first_model()
        self.name, self.hash = f"{self.root} ({self.model_id})", None
        self.info = self._optional("GET", "/tokenizer_info")
        self.max_length = int((self.info or {}).get("model_max_length") or 2048)
        self.prefix_id = None
        if self.info is not None:
            start = self.info.get("bos_token") or self.info.get("eos_token")
            self.prefix_id = self.encode(start)[0] if start else None

    # ------------------------------------------------------------------ HTTP

    def _call(self, method: str, route: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.root + route, data=data, method=method, headers=headers)
        deadline = time.monotonic() + self.timeout * 10
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(self._read(response, route, deadline))
        except urllib.error.HTTPError as e:
            detail = " ".join(e.read(2000).decode(errors="replace").split())[:300]
            raise EvalError(f"{self.root}{route}: HTTP {e.code}" + (f": {detail}" if detail else "")) from None
        except TimeoutError:
            raise EvalError(f"{self.root}{route}: the server sent nothing for {self.timeout:g} s") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                raise EvalError(f"{self.root}{route}: no answer within {self.timeout:g} s") from None
            raise EvalError(f"{self.root}{route}: cannot reach the server: {reason}") from None
        except (ValueError, RecursionError):
            raise EvalError(f"{self.root}{route}: the answer is not JSON (or nests too deeply)") from None

    def _read(self, response, route: str, deadline: float) -> bytes:
        """The answer's body, refused past the deadline (a server sending a byte at a time) or MAX_ANSWER."""
        chunks, size = [], 0
        while chunk := response.read1(1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ANSWER:
                raise EvalError(f"{self.root}{route}: the answer is over {MAX_ANSWER >> 20} MiB")
            if time.monotonic() > deadline:
                raise EvalError(f"{self.root}{route}: the answer took over {self.timeout * 10:g} s to arrive")
        return b"".join(chunks)

    def _optional(self, method: str, route: str, body: dict | None = None) -> dict | None:
        try:
            return self._call(method, route, body)
        except EvalError:
            return None

    def _first_model(self) -> str:
        with _expecting(self.root + "/v1/models", "a list of models in `data`"):
            models = self._call("GET", "/v1/models").get("data") or []
            if not models:
                raise EvalError(f"{self.root}/v1/models lists no model; name the one to use (llmlab eval "
                                "--server-model, data distill server_model=)")
            return str(models[0]["id"])

    def encode(self, text: str) -> list[int]:
        with _expecting(self.root + "/tokenize", "`tokens`, a list of token ids"):
            tokens = self._call("POST", "/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise TypeError("not a list of token ids")
            return list(tokens)

    def chat_prompt(self, messages: list[dict]) -> str:
        raise EvalError(f"{self.root}: chat tasks render the checkpoint's chat template; evaluate the checkpoint "
                        "itself, or a task with plain-text prompts")

    chat_stop = ""

    # ------------------------------------------------------------------ requests

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        if self.info is None:
            return self._loglikelihood_text(requests)
        pairs = [encode_pair(self.encode, self.prefix_id, c, x) for c, x in requests]
        return [(s.logprob, s.greedy) for s in self.score_tokens(pairs)]

    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[Score]:
        return score_pairs(pairs, self.max_length, self._score)

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[Score]:
        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = [(list(c) + list(x), len(x)) for c, x in pairs[start:start + self.batch_size]]
            answer = self._call("POST", "/v1/completions", {
                "model": self.model_id, "prompt": [ids for ids, _ in chunk], "max_tokens": 1, "temperature": 0,
                "logprobs": 1, "echo": True, "seed": self.seed})
            with _expecting(self.root + "/v1/completions", "one choice per prompt with echoed logprobs"):
                choices = sorted(answer["choices"], key=lambda c: c["index"])
                if len(choices) != len(chunk):
                    raise ValueError(f"{len(choices)} choices for {len(chunk)} prompts")
                for (ids, n), choice in zip(chunk, choices):
                    lp = choice["logprobs"]
                    scored = _logprobs(lp["token_logprobs"][len(ids) - n:len(ids)], n)
                    tops = lp["top_logprobs"][len(ids) - n:len(ids)]
                    greedy = all(t is not None and v >= max(t.values()) for v, t in zip(scored, tops))
                    out.append(Score(float(sum(scored)), greedy, scored))
        return out

    def _loglikelihood_text(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        out = []
        for context, continuation in requests:
            if context == "":
                raise EvalError(f"{self.root}: scoring text with an empty context needs the server's /tokenize route")
            answer = self._call("POST", "/v1/completions", {
                "model": self.model_id, "prompt": context + continuation, "max_tokens": 1, "temperature": 0,
                "logprobs": 1, "echo": True, "seed": self.seed})
            with _expecting(self.root + "/v1/completions", "a choice with echoed logprobs and text_offset"):
                lp = answer["choices"][0]["logprobs"]
                n_prompt = len(lp["token_logprobs"]) - 1
                picked = [i for i in range(n_prompt) if lp["text_offset"][i] >= len(context)]
                scored = _logprobs([lp["token_logprobs"][i] for i in picked], len(picked))
                greedy = all(v >= max(lp["top_logprobs"][i].values()) for i, v in zip(picked, scored))
                out.append((float(sum(scored)), greedy))
        return out

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        if self.info is None or self.prefix_id is None:
            raise EvalError(f"{self.root}: rolling perplexity needs the server's /tokenizer_info and /tokenize routes")
        return rolling_loglikelihood(self, texts)

    def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        texts = []
        for i, (context, kwargs) in enumerate(requests):
            stops, max_new, temperature = generation_settings(kwargs, f"request {i}")
            body = {"model": self.model_id, "prompt": context, "max_tokens": max_new, "temperature": temperature,
                    "seed": self.seed + i}
            if stops:
                body["stop"] = stops[:4]
            answer = self._call("POST", "/v1/completions", body)
            with _expecting(self.root + "/v1/completions", "a choice with its text"):
                text = answer["choices"][0]["text"]
                if not isinstance(text, str):
                    raise TypeError("text is not a string")
            texts.append(cut_at_stops(text, stops))
        return texts

