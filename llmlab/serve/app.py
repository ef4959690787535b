"""`llmlab serve`: an OpenAI-compatible HTTP API over a checkpoint, with continuous batching.

Routes: `GET /health` (always open), `GET /v1/models`, `POST /v1/completions`, `POST
/v1/chat/completions`, streaming or not; and vLLM's tokenizer routes, at the root and under /v1
(`GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize`), through which lm-eval's
`local-completions` uses the served tokenizer with nothing but the server's address. Requests are
checked field by field (`protocol.py`) and turned into scheduler sequences, one per completion; a
generation worker thread steps the batch (`worker.py`), and each request reads its sequences'
tokens as they come. A client that
disconnects cancels its sequences, freeing their rows at the next step; a full waiting room is
answered 429 with Retry-After. An encoder-decoder (T5) is served alike: its prompt is the encoder's
input (up to max_seq_len tokens, ending with EOS as `TextGenerator` frames it; `echo` is refused,
the input having no log-probabilities) and its completion the decoder's (up to max_target_len).

Security: the server binds 127.0.0.1 unless told otherwise; with an API key (`--api-key` or
LLMLAB_API_KEY) every route but /health needs `Authorization: Bearer <key>`, compared in constant
time; CORS is off unless origins are named; chat templates render in Jinja's immutable sandbox,
over at most `Limits.max_messages` messages, a checkpoint's own in a child process under a time
budget (a runaway template fails its request with a 400 while every other route keeps
answering); every bad request gets a 4xx in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llmlab.generate.sampling import GenerationError
from llmlab.generate.scheduler import Sequence
from llmlab.generate.text import IncrementalText, split_stops, stop_string_check
from llmlab.serve.protocol import (CHAT_FIELDS, COMPLETION_FIELDS, ApiError, Limits, bad, check_depth, check_fields,
                                   check_model, common_fields, completion_prompts, context_check, detokenize_tokens,
                                   tokenize_request)
from llmlab.serve.worker import Failure, Overloaded, Worker
from llmlab.tokenizer.chat import ChatTemplate, ChatTemplateError, check_messages


@dataclass
class ServedModel:
    name: str
    model: object
    tokenizer: object
    template: ChatTemplate
    created: int
    add_bos: bool = False  # start text prompts with the BOS token
    add_eos: bool = False  # end text prompts with the EOS token (an encoder-decoder's input)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """A text prompt's token ids, framed as `TextGenerator.encode` frames it (the BOS and EOS the
        generator adds, from its `add_bos` and `add_eos`); `special=False` adds neither."""
        return self.tokenizer.encode(text, bos=special and self.add_bos, eos=special and self.add_eos)


def create_app(served: ServedModel, worker: Worker, limits: Limits, *, api_key: str | None = None,
               cors_origins: list[str] | None = None) -> FastAPI:
    app = FastAPI(title="llmlab", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer = served.tokenizer

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}", type="server_error").body(),
                            status_code=500)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), api_key.encode())
            if not ok:
                return JSONResponse(ApiError(401, "Incorrect API key provided.", type="authentication_error",
                                             code="invalid_api_key").body(), status_code=401)
        return await call_next(request)

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.get("/health")
    async def health():
        return {"status": "ok", **worker.load}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(served, limits)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != served.name:
            raise ApiError(404, f"The model '{name}' does not exist", type="not_found_error", code="model_not_found")
        return _model_card(served, limits)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request, limits)
        check_fields(body, COMPLETION_FIELDS)
        check_model(body, served.name)
        common = common_fields(body, limits, max_tokens_names=("max_tokens",), default_max_tokens=16,
                               min_max_tokens=0)
        echo = _flag(body, "echo")
        if echo and limits.encoder_decoder:
            raise bad("echo: not available for an encoder-decoder: its prompt is the encoder's input, which has no "
                      "log-probabilities to score; leave echo out", "echo")
        logprobs = body.get("logprobs")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= 5):
            raise bad(f"logprobs: expected an integer in [0, 5], got {logprobs!r}", "logprobs")
        if common.max_tokens == 0 and limits.encoder_decoder:
            raise bad("max_tokens: must be at least 1 (an encoder-decoder's prompt cannot be scored with echo)",
                      "max_tokens")
        if common.max_tokens == 0 and not echo:
            raise bad("max_tokens: 0 is allowed only with echo=true (to score the prompt)", "max_tokens")
        if common.max_tokens == 0 and common.stream:
            raise bad("max_tokens: 0 cannot stream", "max_tokens")
        prompts = [served.encode(p) if isinstance(p, str) else list(p)
                   for p in completion_prompts(body, limits, served.tokenizer.vocab_size)]
        for ids in prompts:
            context_check(len(ids), common.max_tokens, limits)
        common.logprobs = logprobs
        return await _respond(request, "text_completion", prompts, common, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request, limits)
        check_fields(body, CHAT_FIELDS)
        check_model(body, served.name)
        common = common_fields(body, limits, max_tokens_names=("max_tokens", "max_completion_tokens"),
                               default_max_tokens=limits.max_tokens)
        messages = body.get("messages")
        if isinstance(messages, list) and len(messages) > limits.max_messages:
            raise bad(f"messages: at most {limits.max_messages} messages", "messages")
        try:  # a template from a checkpoint renders in a child process, under a budget: off the event loop
            text = await asyncio.to_thread(served.template.render, check_messages(messages, "messages"), True)
        except ChatTemplateError as e:
            raise bad(str(e), "messages") from None
        if _flag(body, "logprobs"):
            common.logprobs = _top_logprobs(body)
        elif body.get("top_logprobs") is not None:
            raise bad("top_logprobs: requires logprobs=true", "top_logprobs")
        ids = served.encode(text)
        if not ids:
            raise bad("messages: the conversation renders to an empty prompt", "messages")
        if not common.max_tokens_given:  # fill what the context leaves (an encoder-decoder's: its decoder's limit)
            common.max_tokens = common.params.max_new_tokens = max(1, limits.room(len(ids)))
        context_check(len(ids), common.max_tokens, limits, "messages")
        common.stop = [served.template.stop, *common.stop] if served.template.stop else common.stop
        return await _respond(request, "chat.completion", [ids], common)

    # ------------------------------------------------------------------ the tokenizer (vLLM's routes)

    @app.get("/tokenizer_info")
    @app.get("/v1/tokenizer_info")
    async def tokenizer_info():
        return _tokenizer_info(served, limits)

    @app.post("/tokenize")
    @app.post("/v1/tokenize")
    async def tokenize(request: Request):
        body = await _json_body(request, limits)
        req = tokenize_request(body, limits)
        check_model(body, served.name)
        text = req.prompt
        if req.messages is not None:
            try:  # as chat completions renders: off the event loop
                text = await asyncio.to_thread(served.template.render, check_messages(req.messages, "messages"),
                                               req.add_generation_prompt)
            except ChatTemplateError as e:
                raise bad(str(e), "messages") from None
        ids = await asyncio.to_thread(served.encode, text, req.add_special_tokens)
        strs = [tokenizer.backend.id_to_token(t) for t in ids] if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": limits.context, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    @app.post("/v1/detokenize")
    async def detokenize(request: Request):
        body = await _json_body(request, limits)
        ids = detokenize_tokens(body, tokenizer.vocab_size)
        check_model(body, served.name)
        return {"prompt": await asyncio.to_thread(tokenizer.decode, ids)}

    # ------------------------------------------------------------------ running a request

    async def _respond(request: Request, kind: str, prompts: list[list[int]], common, *, echo: bool = False):
        rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        stop_ids, stop_text = split_stops(tokenizer, common.stop)
        params = common.params
        params.stop_token_ids = stop_ids
        params.logprobs = common.logprobs
        stop_check = stop_string_check(tokenizer, stop_text)
        sequences = []
        for i, ids in enumerate(prompts):
            for j in range(common.n):
                sequences.append(Sequence(ids, params, seed=None if common.seed is None else common.seed + j,
                                          stop_check=stop_check, index=i * common.n + j))
        try:
            for seq in sequences:
                worker.validate(seq)
        except GenerationError as e:
            raise bad(str(e), "prompt") from None
        usage = {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 0}
        prompt_scores = [None] * len(prompts)
        if echo and common.logprobs is not None:  # a full forward pass each: off the event loop
            prompt_scores = [await asyncio.to_thread(_prompt_logprobs, served, p, common.logprobs) for p in prompts]
        if common.max_tokens == 0:
            choices = [_choice(seq.index, tokenizer.decode(seq.prompt), "length",
                               None if common.logprobs is None else _completion_logprobs(
                                   tokenizer, prompt_scores[seq.index // common.n], [], common.logprobs))
                       for seq in sequences]
            return _final(kind, rid, created, served.name, choices, usage)
        try:
            events = worker.submit(sequences)
        except Overloaded as e:
            raise ApiError(429, f"The server is busy ({e}); retry shortly.", type="rate_limit_error",
                           code="overloaded", headers={"Retry-After": "1"}) from None
        states = {seq.id: _ChoiceState(seq, IncrementalText(tokenizer, stop_text, stop_ids)) for seq in sequences}
        if common.stream:
            return StreamingResponse(_stream(request, kind, rid, created, sequences, events, states, usage, common,
                                             echo), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        done = 0
        try:
            while done < len(sequences):
                try:
                    item = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():  # nobody will read the answer: stop computing it
                        worker.cancel(sequences)
                        return JSONResponse({}, status_code=499)  # nginx's "client closed request"
                    continue
                if isinstance(item, Failure):
                    raise ApiError(500, item.message, type="server_error")
                if states[item.sequence.id].add(item):
                    done += 1
        except BaseException:
            worker.cancel(sequences)
            raise
        choices = []
        for seq in sequences:
            st = states[seq.id]
            usage["completion_tokens"] += len(seq.output)
            prefix = tokenizer.decode(seq.prompt) if echo else ""
            if kind == "chat.completion":
                lp = {"content": _chat_logprobs(tokenizer, st.scored())} if common.logprobs is not None else None
                choices.append({"index": seq.index, "message": {"role": "assistant", "content": st.text.text},
                                "logprobs": lp, "finish_reason": st.finish_reason})
            else:
                lp = None
                if common.logprobs is not None:
                    lp = _completion_logprobs(tokenizer, prompt_scores[seq.index // common.n], st.scored(),
                                              common.logprobs)
                choices.append(_choice(seq.index, prefix + st.text.text, st.finish_reason, lp))
        return _final(kind, rid, created, served.name, choices, usage)

    async def _stream(request, kind, rid, created, sequences, events, states, usage, common,
                      echo) -> AsyncIterator[str]:
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"

        def chunk(choices, extra=None):
            data = {"id": rid, "object": chunk_kind, "created": created, "model": served.name, "choices": choices}
            if common.include_usage:
                data["usage"] = None
            data.update(extra or {})
            return f"data: {json.dumps(data)}\n\n"

        done = 0
        offsets = {seq.id: 0 for seq in sequences}  # where each choice's next token starts in its text
        try:
            for seq in sequences:
                if kind == "chat.completion":
                    yield chunk([{"index": seq.index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}])
                elif echo:
                    prompt = tokenizer.decode(seq.prompt)
                    offsets[seq.id] = len(prompt)
                    yield chunk([{"index": seq.index, "text": prompt, "logprobs": None, "finish_reason": None}])
            while done < len(sequences):
                item = await events.get()
                if isinstance(item, Failure):
                    yield f"data: {json.dumps(ApiError(500, item.message, type='server_error').body())}\n\n"
                    return
                st = states[item.sequence.id]
                delta = st.push(item)
                finished = st.finish_reason is not None
                scored = [item] if item.token_id is not None and common.logprobs is not None else []
                if delta or finished or scored:  # with logprobs every token is reported, text or not
                    seq = item.sequence
                    if kind == "chat.completion":
                        lp = {"content": _chat_logprobs(tokenizer, scored)} if scored else None
                        choice = {"index": seq.index, "delta": {"content": delta} if delta else {},
                                  "logprobs": lp, "finish_reason": st.finish_reason}
                    else:
                        lp = None
                        if scored:
                            lp = _completion_logprobs(tokenizer, None, scored, common.logprobs, offsets[seq.id])
                            offsets[seq.id] += sum(len(t) for t in lp["tokens"])
                        choice = {"index": seq.index, "text": delta, "logprobs": lp,
                                  "finish_reason": st.finish_reason}
                    yield chunk([choice])
                if finished:
                    done += 1
                    usage["completion_tokens"] += len(item.sequence.output)
            if common.include_usage:
                total = usage["prompt_tokens"] + usage["completion_tokens"]
                yield chunk([], {"usage": {**usage, "total_tokens": total}})
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (the generator is closed): free the rows
            worker.cancel([s for s in sequences if s.finish_reason is None])

    return app


# --------------------------------------------------------------------------- helpers


class _ChoiceState:
    """One completion's text and scores as its events arrive."""

    def __init__(self, seq: Sequence, text: IncrementalText):
        self.seq, self.text = seq, text
        self.finish_reason: str | None = None
        self.events = []

    def push(self, event) -> str:
        """Add an event; returns the newly releasable text."""
        self.events.append(event)
        delta = ""
        if event.token_id is not None and not self.text.finished:
            d = self.text.push(event.token_id, event.finish_reason)
            delta = d.text if d else ""
        if event.finish_reason is not None or self.text.finished:
            self.finish_reason = "length" if event.finish_reason == "length" else "stop"
        return delta

    def add(self, event) -> bool:
        self.push(event)
        return event.finish_reason is not None

    def scored(self) -> list:
        return [e for e in self.events if e.token_id is not None]


def _tokenizer_info(served: ServedModel, limits: Limits) -> dict:
    """vLLM's /tokenizer_info: the special tokens and the template a client needs to frame text as the
    server does. `bos_token` is null unless the model takes a BOS (the tokenizer declares one, or the
    server adds one), so that lm-eval starts a document with EOS, as llmlab's data prepares it."""
    tok = served.tokenizer
    name = tok.backend.id_to_token
    bos = tok.bos_token
    if bos is None and served.add_bos:  # `--bos`: the server starts every prompt with it
        bos = name(tok.bos_id)
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
            "eos_token": None if tok.eos_id is None else name(tok.eos_id),
            "pad_token": None if tok.pad_id is None else name(tok.pad_id),
            "add_bos_token": served.add_bos, "add_eos_token": served.add_eos, "chat_template": served.template.source,
            "model_max_length": limits.context, "vocab_size": tok.vocab_size}


def _model_card(served: ServedModel, limits: Limits) -> dict:
    """OpenAI's model object, with vLLM's `max_model_len`: the most tokens a prompt may have (with its
    completion, for a decoder)."""
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "llmlab",
            "max_model_len": limits.context}


async def _json_body(request: Request, limits: Limits) -> dict:
    try:
        raw = await request.body()
    except ClientDisconnect:  # gone before its body arrived: nobody reads the answer
        raise ApiError(400, "the client closed the connection before sending its whole body") from None
    if len(raw) > limits.max_body_bytes:
        raise ApiError(413, f"request body over {limits.max_body_bytes} bytes")
    try:
        body = json.loads(raw)
    except ValueError as e:  # not UTF-8, not JSON, or an integer of more than 4,300 digits
        raise bad(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad(f"request body nests lists and objects deeper than {limits.max_depth} levels") from None
    if not isinstance(body, dict):
        raise bad(f"request body must be a JSON object, got {type(body).__name__}")
    check_depth(body, limits.max_depth)
    return body


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is not None and not isinstance(value, bool):
        raise bad(f"{name}: expected true or false, got {value!r}", name)
    return bool(value)


def _top_logprobs(body: dict) -> int:
    top = body.get("top_logprobs", 0)
    if top is None:
        return 0
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
        raise bad(f"top_logprobs: expected an integer in [0, 20], got {top!r}", "top_logprobs")
    return top


def _choice(index: int, text: str, finish_reason: str | None, logprobs) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def _final(kind, rid, created, name, choices, usage) -> dict:
    usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
    return {"id": rid, "object": kind, "created": created, "model": name,
            "choices": sorted(choices, key=lambda c: c["index"]), "usage": usage}


def _prompt_logprobs(served: ServedModel, ids: list[int], k: int) -> list[tuple[int, float | None, dict]]:
    """(token, log-probability given the tokens before it, top k) for each prompt token: what
    `echo` with `logprobs` returns, and what evaluation harnesses score answers with."""
    import torch

    with torch.inference_mode():
        logits = served.model(torch.tensor([ids], device=next(served.model.parameters()).device))[0].float()
    logp = torch.log_softmax(logits, -1)
    out = [(ids[0], None, {})]
    for i in range(1, len(ids)):
        top = torch.topk(logp[i - 1], k) if k else None
        out.append((ids[i], float(logp[i - 1, ids[i]]),
                    dict(zip(top.indices.tolist(), top.values.tolist())) if top is not None else {}))
    return out


def _completion_logprobs(tokenizer, prompt_scores, events, k: int, offset: int = 0) -> dict:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs (token text -> logprob), text_offset
    (counted from `offset`: where a streamed chunk's first token starts in the choice's text)."""
    rows = list(prompt_scores or []) + [(e.token_id, e.logprob, e.top_logprobs or {}) for e in events]
    tokens, lps, tops, offsets = [], [], [], []
    for token_id, lp, top in rows:
        text = tokenizer.decode([token_id])
        tokens.append(text)
        lps.append(lp)
        tops.append({tokenizer.decode([t]): v for t, v in list(top.items())[:k]} if lp is not None else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(tokenizer, events: list) -> list[dict]:
    out = []
    for e in events:
        text = tokenizer.decode([e.token_id])
        out.append({"token": text, "logprob": e.logprob, "bytes": list(text.encode()),
                    "top_logprobs": [{"token": tokenizer.decode([t]), "logprob": v, "bytes": list(
                        tokenizer.decode([t]).encode())} for t, v in (e.top_logprobs or {}).items()]})
    return out
