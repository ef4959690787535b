"""The chat playground: a checkpoint of the workspace answers in the browser, token by token.

`POST /chat/stream` takes the conversation (JSON) and the decoding settings, checks them as
`llmlab chat` does, and answers with server-sent events: `token` (new text), then `done` or
`error`. The studio keeps the last checkpoint it loaded and runs one generation at a time (a
second waits up to `WAIT_S`); serving many users at once is `llmlab serve`'s job (Deploy page).
A browser that goes away stops its generation at the next token.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
from pathlib import Path

from fastapi import APIRouter, Form, Request
from fastapi.responses import StreamingResponse

from llmlab.common import LlmlabError
from llmlab.studio.web import Studio, need, refused

WAIT_S = 120.0
MAX_MESSAGES_CHARS = 1_000_000
_lock = threading.Lock()
_loaded: dict = {}  # the studio's one loaded checkpoint: {"key": (path, mtime), "generator", "template"}


def unload() -> None:
    """Let the loaded checkpoint go (the studio is closing)."""
    _loaded.clear()


def checkpoints(studio: Studio) -> list[str]:
    """Workspace-relative folders a playground, an evaluation or a server can load: the runs that hold a
    model (`final/` or a checkpoint), and HF or llmlab model folders under `models/` and `exports/`."""
    found = []
    with studio.registry() as registry:
        for run in registry.runs():
            folder = studio.workspace / run["path"]
            if (folder / "final" / "config.json").is_file() or any((folder / "checkpoints").glob("step-*")):
                found.append(run["path"])
    for parent in ("models", "exports"):
        for config in sorted((studio.workspace / parent).glob("*/config.json")):
            found.append(str(config.parent.relative_to(studio.workspace)))
    return found


def router(studio: Studio) -> APIRouter:
    r = APIRouter()

    @r.get("/chat")
    def chat_page(request: Request, checkpoint: str = ""):
        return studio.page(request, "chat.html", checkpoints=checkpoints(studio), chosen=checkpoint)

    @r.post("/chat/stream")
    def chat_stream(request: Request, checkpoint: str = Form(..., max_length=1000),
                    messages: str = Form(..., max_length=MAX_MESSAGES_CHARS), mode: str = Form("chat"),
                    system: str = Form("", max_length=20_000), max_new_tokens: int = Form(128),
                    temperature: float = Form(0.8), top_k: int = Form(0), top_p: float = Form(1.0),
                    min_p: float = Form(0.0), repetition_penalty: float = Form(1.0), seed: int | None = Form(None)):
        need(request, "viewer")
        from llmlab.generate.commands import sampling_params
        from llmlab.generate.sampling import GenerationError

        ns = argparse.Namespace(checkpoint=str(studio.inside(checkpoint, "checkpoint")), tokenizer=None, device="auto",
                                bos=False, compile=False, max_new_tokens=max_new_tokens, default_max_new_tokens=128,
                                temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, frequency_penalty=0.0, presence_penalty=0.0,
                                seed=seed, stop=[])
        if mode not in ("chat", "complete"):
            return refused(f"mode {mode!r}: expected chat or complete", "mode")
        if seed is not None and not 0 <= seed < 2**63:
            return refused(f"seed {seed}: expected 0 to 2**63 - 1", "seed")
        try:
            sampling_params(ns)
            history = json.loads(messages)
        except GenerationError as e:  # named as the command line names it: --top-p is the form's top_p
            return refused(re.sub(r"--([a-z-]+)", lambda m: m.group(1).replace("-", "_"), str(e)))
        except (ValueError, RecursionError):
            return refused("messages: expected a JSON list of {role, content} objects", "messages")
        if not isinstance(history, list) or not history or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in history):
            return refused("messages: expected a non-empty JSON list of {role, content} objects", "messages")
        try:
            for m in history:
                m["content"].encode()
        except UnicodeEncodeError:
            return refused("messages: not valid text (a lone surrogate)", "messages")
        return StreamingResponse(_stream(ns, history, mode, system), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    return r


def _prepare(ns: argparse.Namespace, history: list[dict], mode: str, system: str):
    """The chat session and prompt ids for this request, loading the checkpoint unless it is loaded."""
    from llmlab.generate.commands import load_generator, sampling_params
    from llmlab.generate.text import ChatSession
    from llmlab.tokenizer.chat import load_chat_template

    path = Path(ns.checkpoint)
    key = (str(path), (path / "config.json").stat().st_mtime if (path / "config.json").is_file() else None)
    if _loaded.get("key") != key:
        _loaded.clear()
        generator = load_generator(ns)
        _loaded.update(key=key, generator=generator, template=load_chat_template(ns.checkpoint, None))
    generator = _loaded["generator"]
    params = sampling_params(ns, generator.output_limit)
    session = ChatSession(generator, _loaded["template"], params, system=system or None)
    if mode == "complete":  # the newest message is raw text to continue
        return session, generator.encode(history[-1]["content"]), []
    messages = session.messages + [{"role": m.get("role", "user"), "content": m["content"]} for m in history]
    ids, _ = session.prompt_ids(messages)
    return session, ids, session.stop


def _stream(ns: argparse.Namespace, history: list[dict], mode: str, system: str):
    """SSE lines of one reply; runs in the server's thread pool, one reply at a time."""
    if not _lock.acquire(timeout=WAIT_S):
        yield f"event: error\ndata: {json.dumps('the playground is busy with another reply; try again')}\n\n"
        return
    tokens = 0
    try:
        session, prompt, stop = _prepare(ns, history, mode, system)
        for delta in session.generator.stream(prompt, session.params, stop=stop):
            tokens += 1
            if delta.text:
                yield f"event: token\ndata: {json.dumps(delta.text)}\n\n"
        yield f"event: done\ndata: {json.dumps({'tokens': tokens})}\n\n"
    except LlmlabError as e:
        yield f"event: error\ndata: {json.dumps(str(e))}\n\n"
    except Exception as e:  # a bug: the reply ends with its name, the studio goes on
        yield f"event: error\ndata: {json.dumps(f'internal error ({type(e).__name__}: {e})')}\n\n"
    finally:
        _lock.release()
