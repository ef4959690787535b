"""`llmlab serve CHECKPOINT`: load the model, start the generation worker, run uvicorn."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import time
from pathlib import Path

from llmlab.common import LlmlabError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmlab.generate import commands

    commands.add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $LLMLAB_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model id clients ask for (default: folder name)")
    p.add_argument("--template", help="chat template: a built-in name or a Jinja file (default: the checkpoint's)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="sequences that may wait; beyond this, 429")
    p.add_argument("--max-tokens", type=int, default=None, help="most tokens one completion may ask for")
    p.add_argument("--max-n", type=int, default=16, help="most completions per prompt")
    p.add_argument("--cors-origin", action="append", default=[], help="allow browser calls from this origin")


def build(ns: argparse.Namespace):
    """(app, worker) for the parsed arguments."""
    from llmlab.generate.commands import load_generator
    from llmlab.serve.app import ServedModel, create_app
    from llmlab.serve.protocol import Limits
    from llmlab.serve.worker import Worker
    from llmlab.tokenizer.chat import load_chat_template

    for name in ("max_batch", "max_queue", "max_n"):
        if getattr(ns, name) < 1:
            raise LlmlabError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(ns, name)}")
    if ns.max_tokens is not None and ns.max_tokens < 1:
        raise LlmlabError(f"--max-tokens must be at least 1, got {ns.max_tokens}")
    name = ns.served_model_name or Path(ns.checkpoint).resolve().name  # a run directory's name, not final/'s
    generator = load_generator(ns, ("decoder", "encoder-decoder"), "llmlab serve")
    engine, tokenizer = generator.engine, generator.tokenizer
    model = engine.model.model if engine.encoder_decoder else engine.model  # T5 itself, not the engine's adapter
    context, output = int(model.config.max_seq_len), generator.output_limit[0]
    limits = Limits(context=context, max_tokens=min(ns.max_tokens or output, output), max_n=ns.max_n,
                    vocab_size=int(model.config.vocab_size), encoder_decoder=engine.encoder_decoder)
    template = load_chat_template(ns.tokenizer or ns.checkpoint, ns.template)
    served = ServedModel(name, model, tokenizer, template, int(time.time()), add_bos=generator.add_bos,
                         add_eos=generator.add_eos)
    worker = Worker(model, max_batch=ns.max_batch, max_queue=ns.max_queue)
    api_key = ns.api_key if ns.api_key is not None else os.environ.get("LLMLAB_API_KEY") or None
    return create_app(served, worker, limits, api_key=api_key, cors_origins=ns.cors_origin), worker


def check_address(host: str, port: int) -> None:
    """Refuse, before the model loads, a port out of range, a host that is not an address of this
    machine, or an address another server holds."""
    if not 1 <= port <= 65535:
        raise LlmlabError(f"--port must be in [1, 65535], got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise LlmlabError(f"--host {host!r} is not an address or a name that resolves: {e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            raise LlmlabError(f"cannot listen on {host}:{port}: {e.strerror or e}"
                              f"{' (another server holds the port)' if e.errno == errno.EADDRINUSE else ''}") from None


def run_serve(ns: argparse.Namespace) -> None:
    import uvicorn

    check_address(ns.host, ns.port)
    app, worker = build(ns)
    worker.start()
    print(f"serving {ns.checkpoint} on http://{ns.host}:{ns.port}/v1 (Ctrl-C stops)", flush=True)
    try:
        uvicorn.run(app, host=ns.host, port=ns.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        worker.stop()
