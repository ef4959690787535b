"""The workflow pages: Data (upload, prepare, synthesise), Model (size and cost), Configure (the
typed configs as a form), Evaluate and Deploy. Each turns a form into the `llmlab` command a user
would type, checked by the same code as the command line, and queues it as a job.

Where things go in a workspace: `uploads/` (uploaded files), `tokenizers/<name>/`, `data/<name>/`
(prepared or synthetic data), `configs/<name>.yaml`, `runs/<name>/`, `evals/<name>/`,
`exports/<name>/` (HF folders) or `exports/<name>.gguf`; `models/<name>/` holds model folders
copied in by hand.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import socket
import tempfile
import time
from pathlib import Path

import yaml
from fastapi import APIRouter, Form, HTTPException, Request

from llmlab.common import LlmlabError
from llmlab.config import flatten
from llmlab.serve.commands import check_address
from llmlab.studio.chat import checkpoints
from llmlab.studio.store import NAME
from llmlab.studio.web import FieldError, Studio, done, need, refused

UPLOAD_SUFFIXES = (".txt", ".md", ".jsonl", ".json")
CHUNK = 1 << 20
MAX_CONFIG_BYTES = 1 << 20
ACTIONS = ("check", "save", "launch")
# verb -> (module, config class) for the Configure page
TRAINERS = {"pretrain": ("llmlab.train.pretrain", "PretrainConfig"),
            "finetune": ("llmlab.train.finetune", "FinetuneConfig"),
            "align": ("llmlab.align.run", "AlignConfig")}
FORMATS = {  # a JSONL upload's kind, by the keys of its first record
    "alpaca": {"instruction", "output"}, "chat": {"messages"}, "preference": {"prompt", "chosen", "rejected"},
    "text": {"text"},
}


def _name(value: str, field: str) -> str:
    if not NAME.fullmatch(value or ""):
        raise FieldError(f"{field} {value!r}: expected 1-64 letters, digits, '_', '.' or '-', starting with a "
                         "letter or digit", field)
    return value


def _fresh(studio: Studio, relative: str, field: str) -> str:
    """`relative`, refused when something already lies there (the studio never writes over it)."""
    if os.path.lexists(studio.workspace / relative):
        raise FieldError(f"{field}: {relative} exists already; choose another name", field)
    return relative


def router(studio: Studio) -> APIRouter:
    r = APIRouter()
    ws = studio.workspace

    # ------------------------------------------------------------------ data

    @r.get("/data")
    def data_page(request: Request):
        uploads = [{"name": f.name, "size": f.stat().st_size, "modified": f.stat().st_mtime, "kind": _kind(f)}
                   for f in sorted((ws / "uploads").glob("*")) if f.is_file() and not f.name.startswith(".")]
        prepared = [_report(m.parent) for m in sorted((ws / "data").glob("*/manifest.json"))]
        synthetic = sorted(str(f.parent.relative_to(ws)) for f in (ws / "data").glob("*/train.jsonl"))
        tokenizers = sorted(str(f.parent.relative_to(ws)) for f in (ws / "tokenizers").glob("*/tokenizer.json"))
        return studio.page(request, "data.html", uploads=uploads, prepared=prepared, synthetic=synthetic,
                           tokenizers=tokenizers, limit=studio.max_upload_bytes)

    @r.post("/data/upload")
    async def upload(request: Request, name: str):
        need(request, "editor")
        name = _upload_name(name)
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > studio.max_upload_bytes:
            return refused(f"{name}: {int(size):,} bytes, more than the studio's limit of "
                           f"{studio.max_upload_bytes:,}", "file", status_code=413)
        folder = ws / "uploads"
        folder.mkdir(exist_ok=True)
        fd, part = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
        written = 0
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    written += len(chunk)
                    if written > studio.max_upload_bytes:
                        raise _TooBig()
                    f.write(chunk)
            name = _place(part, folder, name).name
        except _TooBig:
            return refused(f"{name}: more than the studio's limit of {studio.max_upload_bytes:,} bytes", "file",
                           status_code=413)
        finally:  # a refused or dropped upload leaves nothing behind
            if os.path.exists(part):
                os.unlink(part)
        return done("/data", message=f"uploaded {name} ({written:,} bytes)")

    @r.post("/data/prepare")
    def prepare(request: Request, name: str = Form(...), inputs: list[str] = Form(...),
                tokenizer: str = Form("new"), vocab_size: int = Form(4096), tokenizer_kind: str = Form("bpe"),
                val_frac: float = Form(0.05), dedup: str = Form("near"), text_field: str = Form("text")):
        session = need(request, "editor")
        from llmlab.config import load_config
        from llmlab.data.prepare import PrepareConfig, TokenizerTrainConfig

        name = _name(name, "name")
        out = _fresh(studio, f"data/{name}", "name")
        files = [f"uploads/{_upload_name(i)}" for i in inputs]
        for f in files:
            if not (ws / f).is_file():
                return refused(f"inputs: {f} is not an uploaded file", "inputs")
        argv = []
        if tokenizer == "new":
            tok = _fresh(studio, f"tokenizers/{name}", "name")
            train = [f"inputs={json.dumps(files)}", f"out_dir={tok}", f"vocab_size={vocab_size}",
                     f"kind={tokenizer_kind}", f"text_field={json.dumps(text_field)}"]
            load_config(TokenizerTrainConfig, None, train)
            argv = ["tokenizer", "train", *train, "--then"]
        else:
            tok = str(studio.inside(tokenizer, "tokenizer").relative_to(ws))
            if not (ws / tok / "tokenizer.json").is_file():
                return refused(f"tokenizer: {tok} holds no tokenizer.json", "tokenizer")
        overrides = [f"inputs={json.dumps(files)}", f"out_dir={out}", f"tokenizer={tok}", f"val_frac={val_frac}",
                     f"dedup={dedup}", f"text_field={json.dumps(text_field)}"]
        load_config(PrepareConfig, None, overrides)  # the command line's checks, before anything is queued
        argv += ["data", "prepare", *overrides]
        job = studio.queue.submit("data prepare", f"prepare {out}", argv, session["user"])
        return done(f"/jobs/{job}", message="queued")

    @r.post("/data/synth")
    def synth(request: Request, name: str = Form(...), format: str = Form("alpaca"), train: int = Form(4000),
              val: int = Form(200), test: int = Form(200), difficulty: int = Form(1)):
        session = need(request, "editor")
        from llmlab.config import load_config
        from llmlab.data.synth import SynthConfig

        out = _fresh(studio, f"data/{_name(name, 'name')}", "name")
        overrides = [f"out_dir={out}", f"format={format}", f"train={train}", f"val={val}", f"test={test}",
                     f"difficulty={difficulty}"]
        load_config(SynthConfig, None, overrides)
        job = studio.queue.submit("data synth", f"synthesise {out}", ["data", "synth", *overrides], session["user"])
        return done(f"/jobs/{job}", message="queued")

    # ------------------------------------------------------------------ model

    @r.get("/model")
    def model_page(request: Request, source: str = "preset", preset: str = "llama-1m", run: str = "",
                   folder: str = "", hardware: str = "h100-80gb", devices: int = 1, batch: int = 8,
                   tokens: float | None = None, seq_len: int | None = None):
        from llmlab.models.presets import PRESETS
        from llmlab.plan.hardware import CATALOG

        found = checkpoints(studio)
        runs = [c for c in found if c.startswith("runs/")]
        folders = [c for c in found if not c.startswith("runs/")]
        estimate, error, use = None, None, None
        try:
            model, use = _model_source(studio, source, preset, run, folder)
            estimate = _plan(model, hardware, devices, batch, tokens, seq_len)
        except LlmlabError as e:
            error = str(e)
        return studio.page(request, "model.html", presets=list(PRESETS), hardware_list=[*CATALOG, "this-cpu"],
                           runs=runs, folders=folders, source=source, preset=preset, run=run, folder=folder,
                           hardware=hardware, devices=devices, batch=batch, tokens=tokens, seq_len=seq_len,
                           estimate=estimate, error=error, use=use)

    # ------------------------------------------------------------------ configure

    @r.get("/configure")
    def configure_page(request: Request, verb: str = "pretrain", start: str = "", preset: str = "", base: str = "",
                       dataset: str = ""):
        if verb not in TRAINERS:
            raise HTTPException(404, f"no config for {verb!r}; one of {', '.join(TRAINERS)}")
        values, note = {}, None
        if start:
            try:
                values = flatten(_read_yaml(_saved_config(studio, start)))
            except LlmlabError as e:
                note = str(e)
        if preset:
            from llmlab.config import to_dict
            from llmlab.models.presets import PRESETS, get_preset

            if preset in PRESETS:
                values.update(flatten({"model": to_dict(get_preset(preset))}))
        if base:
            values["base"] = base
        if dataset:
            values["data"] = dataset
        fields = form_fields(_config_class(verb), values)
        groups: dict[str, list[dict]] = {"run": []}  # the top-level keys first, then each section in order
        for f in fields:
            groups.setdefault(f["group"], []).append(f)
        configs = sorted(str(f.relative_to(ws)) for f in (ws / "configs").glob("*.yaml"))
        data = sorted({str(f.parent.relative_to(ws)) for f in (ws / "data").glob("*/*") if f.is_file()})
        return studio.page(request, "configure.html", verb=verb, verbs=list(TRAINERS), groups=groups, note=note,
                           configs=configs, start=start, data=data)

    @r.post("/configure")
    async def configure(request: Request):
        form = await request.form()
        if any(not isinstance(value, str) for _, value in form.multi_items()):
            return refused("the config form takes text fields only, not files")
        verb, name, action = form.get("verb", ""), form.get("name", ""), form.get("action", "check")
        if verb not in TRAINERS:
            return refused(f"verb {verb!r}: one of {', '.join(TRAINERS)}", "verb")
        if action not in ACTIONS:
            return refused(f"action {action!r}: one of {', '.join(ACTIONS)}")
        if action != "check":
            session = need(request, "editor")
        _name(name, "name")
        cls = _config_class(verb)
        fields = form_fields(cls, {})
        given = {key[2:]: value for key, value in form.multi_items() if key.startswith("f.")}
        unknown = sorted(set(given) - {f["key"] for f in fields})
        if unknown:
            return refused(f"unknown config keys: {', '.join(unknown)}")
        overrides = [override(f, given[f["key"]]) for f in fields
                     if f["key"] in given and given[f["key"]].strip() != f["text"] and f["key"] != "out_dir"]
        overrides.append(f"out_dir=runs/{name}")
        from llmlab.config import ConfigError, load_config, save_config, to_dict

        try:
            cfg = load_config(cls, None, overrides)
        except ConfigError as e:
            message = str(e).removeprefix("command line: ")
            return config_error(message, [f["key"] for f in fields])
        outside = _outside(to_dict(cfg))
        if outside:
            key, value = outside
            return refused(f"{key}: {value!r} lies outside the workspace; a job reads and writes inside it only "
                           "(a path relative to the workspace, without '..')", f"f.{key}")
        command = shlex.join(["llmlab", verb, *overrides])
        if action == "check":
            return {"message": "the config is valid", "command": command}
        config = f"configs/{name}.yaml"
        if action == "launch":
            _fresh(studio, f"runs/{name}", "name")
            if studio.queue.active(f"runs/{name}"):
                return refused(f"name: a job for runs/{name} is queued or running", "name")
        if (ws / config).exists() and form.get("replace") != "on":
            return refused(f"{config} exists already; tick 'replace' or choose another name", "name")
        save_config(cfg, ws / config)
        if action == "save":
            return {"message": f"saved {config}", "command": command}
        job = studio.queue.submit(verb, f"{verb} runs/{name}", [verb, config], session["user"], f"runs/{name}")
        return done(f"/jobs/{job}", message=f"queued {verb} runs/{name}", command=command)

    # ------------------------------------------------------------------ evaluate

    @r.get("/evaluate")
    def evaluate_page(request: Request):
        from llmlab.eval.builtin import BUILTIN_TASKS

        results = [_results(f.parent) for f in sorted((ws / "evals").glob("*/results.json"), reverse=True)]
        return studio.page(request, "evaluate.html", checkpoints=checkpoints(studio), builtin=list(BUILTIN_TASKS),
                           results=results, uploads=sorted(f.name for f in (ws / "uploads").glob("*.txt")))

    @r.get("/evaluate/{name}")
    def evaluation_page(request: Request, name: str, task: str = ""):
        folder = ws / "evals" / name
        if not NAME.fullmatch(name) or not (folder / "results.json").is_file():
            raise HTTPException(404, f"no evaluation {name!r}")
        samples = []
        try:
            with open(folder / "samples.jsonl", encoding="utf-8") as f:
                for line in f:
                    sample = json.loads(line)
                    if not isinstance(sample, dict):
                        continue
                    if not task or sample.get("task") == task:
                        samples.append(sample)
                    if len(samples) >= 200:
                        break
        except (OSError, ValueError, RecursionError):
            pass
        return studio.page(request, "evaluation.html", result=_results(folder), samples=samples, task=task)

    @r.post("/evaluate")
    def evaluate(request: Request, checkpoint: str = Form(...), tasks: list[str] = Form([]), extra: str = Form(""),
                 limit: int | None = Form(None), num_fewshot: int | None = Form(None)):
        session = need(request, "editor")
        from llmlab.config import load_config
        from llmlab.eval.run import EvalConfig

        model = _checkpoint(studio, checkpoint)
        names = [*tasks, *(t.strip() for t in extra.split(",") if t.strip())]
        if not names:
            return refused("choose at least one task", "tasks")
        for n in names:
            if "/" in n or n.endswith((".txt", ".md")):  # a text file's perplexity: an upload
                names[names.index(n)] = str(studio.inside(n if "/" in n else f"uploads/{n}", "tasks").relative_to(ws))
        out = _fresh(studio, f"evals/{Path(model).name}-{time.strftime('%Y%m%d-%H%M%S')}", "evaluation")
        overrides = [f"tasks={json.dumps(names)}", f"out_dir={out}"]
        if limit:
            overrides.append(f"limit={limit}")
        if num_fewshot is not None:
            overrides.append(f"num_fewshot={num_fewshot}")
        load_config(EvalConfig, None, overrides)
        job = studio.queue.submit("eval", f"evaluate {model}", ["eval", model, *overrides], session["user"])
        return done(f"/jobs/{job}", message="queued")

    # ------------------------------------------------------------------ deploy

    @r.get("/deploy")
    def deploy_page(request: Request):
        with studio.store() as store:
            servers = [j for j in store.jobs("queued", "running", kind="serve")]
        for s in servers:
            s["port"] = int(s["argv"][s["argv"].index("--port") + 1])
            s["model"] = s["argv"][s["argv"].index("--served-model-name") + 1]
        exports = sorted(p.name for p in (ws / "exports").glob("*")) if (ws / "exports").is_dir() else []
        return studio.page(request, "deploy.html", checkpoints=checkpoints(studio), servers=servers,
                           exports=exports, host=socket.gethostname())

    @r.post("/deploy/serve")
    def serve(request: Request, checkpoint: str = Form(...), port: int = Form(8000), name: str = Form("")):
        session = need(request, "editor")
        model = _checkpoint(studio, checkpoint)
        name = _name(name or Path(model).name, "name")
        if not 1024 <= port <= 65535:
            return refused(f"port {port}: expected 1024-65535", "port")
        with studio.store() as store:
            if any(int(j["argv"][j["argv"].index("--port") + 1]) == port
                   for j in store.jobs("queued", "running", kind="serve")):
                return refused(f"port {port}: a server of this studio uses it", "port")
        try:
            check_address("127.0.0.1", port)
        except LlmlabError as e:
            return refused(f"port {port}: {e}", "port")
        argv = ["serve", model, "--port", str(port), "--served-model-name", name]
        job = studio.queue.submit("serve", f"serve {model} on :{port}", argv, session["user"])
        return done("/deploy", message=f"starting job {job}; the server answers once the model has loaded")

    @r.post("/deploy/export")
    def export(request: Request, checkpoint: str = Form(...), to: str = Form("hf"), outtype: str = Form("f16"),
               name: str = Form(...)):
        session = need(request, "editor")
        from llmlab.models.io import resolve_model_dir

        model = _checkpoint(studio, checkpoint)  # a run: its final model, else its newest checkpoint
        model = _checkpoint(studio, str(resolve_model_dir(ws / model).relative_to(ws)))
        if to not in ("hf", "gguf") or outtype not in ("f32", "f16", "q8_0"):
            return refused("export to hf or gguf (f32, f16 or q8_0)", "to")
        out = _fresh(studio, f"exports/{_name(name, 'name')}" + (".gguf" if to == "gguf" else ""), "name")
        (ws / "exports").mkdir(exist_ok=True)
        argv = ["convert", model, "--to", to, "--out", out] + (["--outtype", outtype] if to == "gguf" else [])
        job = studio.queue.submit("convert", f"export {model} to {to}", argv, session["user"])
        return done(f"/jobs/{job}", message="queued")

    return r


# --------------------------------------------------------------------------- helpers


class _TooBig(Exception):
    pass


def _checkpoint(studio: Studio, value: str) -> str:
    """A model folder of the workspace, as a path relative to it that no command reads as an option."""
    path = studio.inside(value, "checkpoint")
    if not path.is_dir():
        raise FieldError(f"checkpoint: {value!r} is not a folder of this workspace", "checkpoint")
    relative = str(path.relative_to(studio.workspace))
    return f"./{relative}" if relative.startswith("-") else relative


def _upload_name(name: str) -> str:
    """The file name an upload is stored under: its last path part, with only safe characters."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:100]
    if not base or not base.lower().endswith(UPLOAD_SUFFIXES):
        raise LlmlabError(f"file {name!r}: expected a name ending in {', '.join(UPLOAD_SUFFIXES)}")
    return base


def _place(part: str, folder: Path, name: str) -> Path:
    """Link the finished upload `part` in as `folder/name`, or `name-1`, `name-2`, ... when taken: an
    upload never replaces another (a link fails on an existing name, even one made meanwhile)."""
    stem, suffix = os.path.splitext(name)
    for n in range(10_000):
        target = folder / (name if n == 0 else f"{stem}-{n}{suffix}")
        try:
            os.link(part, target)
            return target
        except FileExistsError:
            continue
    raise LlmlabError(f"{name}: 10,000 uploads of this name already; rename the file")


def _kind(file: Path) -> str:
    if file.suffix not in (".jsonl", ".json"):
        return "text"
    try:
        with open(file, encoding="utf-8") as f:
            first = json.loads(f.readline(1 << 20))
    except (OSError, ValueError, RecursionError):
        return "unreadable JSON"
    keys = set(first) if isinstance(first, dict) else set()
    for kind, needed in FORMATS.items():
        if needed <= keys:
            return kind
    return f"JSONL ({', '.join(sorted(keys)[:6])})"


def _report(folder: Path) -> dict:
    """A prepared data folder's report: documents in, removed (by reason) and kept, tokens per split,
    and the first tokens of a split decoded."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return {"name": folder.name, "error": f"unreadable manifest.json ({e})"}
    report = {"name": folder.name, "path": f"data/{folder.name}", "documents": manifest.get("documents", {}),
              "splits": {k: {"documents": v.get("documents"), "tokens": v.get("tokens")}
                         for k, v in manifest.get("splits", {}).items()},
              "vocab_size": manifest.get("vocab_size"), "sample": ""}
    try:
        import numpy as np

        from llmlab.tokenizer import load_tokenizer

        shard = next(iter(sorted(folder.glob("train_*.bin"))), None)
        tokenizer = Path(manifest.get("tokenizer_path", ""))
        if shard is not None and (tokenizer / "tokenizer.json").is_file():
            ids = np.fromfile(shard, dtype=manifest.get("dtype", "uint16"), count=200)
            report["sample"] = load_tokenizer(tokenizer).decode(ids.tolist())
    except (OSError, ValueError, LlmlabError):
        pass
    return report


def _results(folder: Path) -> dict:
    try:
        data = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"name": folder.name, "rows": [], "models": []}
    rows = []
    for result in data.get("results", []):
        for metric, value in (result.get("metrics") or {}).items():
            if isinstance(value, (int, float)):
                rows.append((result.get("model"), result.get("task"), metric, value))
    return {"name": folder.name, "rows": rows, "models": [m.get("name") for m in data.get("models", [])],
            "created": (folder / "results.json").stat().st_mtime}


class _NoAliases(yaml.SafeLoader):
    """YAML without anchors and aliases: a few hundred bytes of nested aliases expand to gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases (*name) are not allowed here")
        return super().compose_node(parent, index)


def _saved_config(studio: Studio, relative: str) -> Path:
    """A config saved in the workspace's configs/ folder (the only files the Configure page opens)."""
    path = studio.inside(relative, "start")
    if path.parent != studio.workspace / "configs" or path.suffix != ".yaml" or not path.is_file():
        raise LlmlabError(f"{relative}: not a config saved in configs/ (configs/NAME.yaml)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise LlmlabError(f"{relative}: more than {MAX_CONFIG_BYTES // 1024} KiB, too big for a config")
    return path


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoAliases)  # noqa: S506 (a SafeLoader)
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as e:
        raise LlmlabError(f"{path.name}: cannot read it as a config ({e})") from None
    if not isinstance(data, dict):
        raise LlmlabError(f"{path.name}: not a config (a mapping)")
    return data


def _outside(config: dict, prefix: str = "") -> tuple[str, str] | None:
    """The first (key, value) of a config whose text may name a path outside the workspace: absolute,
    with a '..' part, under the home folder (~), or a file: URL."""
    for key, value in config.items():
        values = value if isinstance(value, list) else [value]
        if isinstance(value, dict):
            found = _outside(value, f"{prefix}{key}.")
            if found:
                return found
            continue
        for v in values:
            if not isinstance(v, str):
                continue
            if v.startswith("file:"):  # a file: URL may name any path
                return f"{prefix}{key}", v
            if "://" in v:
                continue  # a server's URL (an MLflow tracking server), not a path
            if v.startswith(("/", "~")) or ".." in Path(v).parts or "\0" in v:
                return f"{prefix}{key}", v
    return None


def _config_class(verb: str) -> type:
    import importlib

    module, name = TRAINERS[verb]
    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------- the config form


def _text(value) -> str:
    """A config value as the form shows it (and as a key=value override reads it back: JSON is YAML)."""
    return value if isinstance(value, str) else json.dumps(value)


def form_fields(cls: type, values: dict) -> list[dict]:
    """One entry per leaf key of the config class: key, type, default, help, the choices of a
    Literal or bool, the text the form shows (`values` wins over the default), and its group."""
    from llmlab.config import config_help

    fields = []
    for key, type_name, default, help_text in config_help(cls):
        try:
            default_value = ast.literal_eval(default) if default != "required" else ""
        except (ValueError, SyntaxError):
            default_value = default
        choices = re.findall(r"'([^']*)'", type_name) if re.fullmatch(r"('[^']*'( \| )?)+", type_name) else []
        if type_name == "bool":
            choices = ["true", "false"]
        text = _text(default_value) if default != "required" else ""
        shown = _text(values[key]) if key in values else text
        fields.append({"key": key, "type": type_name, "default": default, "help": help_text, "choices": choices,
                       "text": text, "value": shown, "group": key.split(".")[0] if "." in key else "run"})
    return fields


def override(field: dict, text: str) -> str:
    """The key=value override for a form value: text for a string field is quoted, so that YAML
    keeps `yes` or `007` a string."""
    text = text.strip()
    if field["type"] in ("str", "str | None") and not (field["type"] == "str | None" and text == "null"):
        try:
            plain = yaml.safe_load(text) == text
        except yaml.YAMLError:
            plain = False
        return f"{field['key']}={text if plain else json.dumps(text)}"
    return f"{field['key']}={text}"


def config_error(message: str, keys: list[str]):
    """A config error shown beside the field it names (the longest key the message starts with)."""
    named = [k for k in keys for form in (k, k.replace(".", ": ")) if message.startswith((f"{form}:", f"{form} "))]
    field = max(named, key=len) if named else None
    return refused(message, f"f.{field}" if field else None)


def _model_source(studio: Studio, source: str, preset: str, run: str, folder: str) -> tuple[str, str]:
    """The planner's model argument for the chosen source, and the Configure link that uses it."""
    from llmlab.models.presets import PRESETS

    if source == "preset":
        if preset not in PRESETS:
            raise LlmlabError(f"no preset {preset!r}")
        return preset, f"/configure?verb=pretrain&preset={preset}"
    if source == "run":
        path = studio.inside(run, "run")
        if not (path / "config.yaml").is_file():
            raise LlmlabError(f"{run}: not a run folder (no config.yaml)")
        return str(path / "config.yaml"), f"/configure?verb=finetune&base={run}"
    if source == "folder":
        from llmlab.config import to_dict
        from llmlab.models.io import read_config, resolve_model_dir

        path = resolve_model_dir(studio.inside(folder, "folder"))
        cfg = read_config(path)[0]
        handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
        with handle:
            yaml.safe_dump({"model": to_dict(cfg)}, handle)
        return handle.name, f"/configure?verb=finetune&base={folder}"
    raise LlmlabError(f"source {source!r}: preset, run or folder")


def _plan(model: str, hardware: str, devices: int, batch: int, tokens: float | None, seq_len: int | None) -> dict:
    from llmlab.plan import commands as plan_commands

    parser = argparse.ArgumentParser(add_help=False)
    plan_commands.add_arguments(parser)
    ns = parser.parse_args([])
    ns.model, ns.hardware, ns.devices, ns.batch, ns.tokens, ns.seq_len = model, hardware, devices, batch, tokens, \
        seq_len
    try:
        return plan_commands.plan(ns)
    finally:
        if model.startswith(tempfile.gettempdir()):
            os.unlink(model)
