"""The README stays true: its file tree names every module, its Python example runs, and so does every
command of its command-line section."""

from __future__ import annotations

import io
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _tree_paths() -> set[str]:
    tree = README.split("## Files", 1)[1].split("```")[1]
    paths, stack = set(), []
    for line in tree.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m:
            continue
        depth, name = len(m.group(1)) // 2, m.group(2)
        stack[depth:] = [name.rstrip("/")]
        if not name.endswith("/"):
            paths.add("/".join(stack))
    return paths


def test_file_tree_lists_every_module_and_only_real_files():
    listed = _tree_paths()
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "llmlab").rglob("*.py")}
    assert len(modules) >= 12
    assert modules <= listed, f"add to the README tree: {sorted(modules - listed)}"
    missing = sorted(p for p in listed if not (ROOT / p).exists())
    assert not missing, f"the README tree lists files that do not exist: {missing}"


def test_python_examples_run():
    section = README.split("## Python", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python")[1:]]
    assert len(blocks) == 3
    code = "\n".join(line for b in blocks for line in b.splitlines() if "path/to/hf-folder" not in line)
    exec(compile(code, "README.md", "exec"), {})


# ---- the command-line section, run as written ----------------------------------------------------------

KEY = "sk-readme-key"
STUDIO_PASSWORD = "readme-password"  # what `llmlab studio user add` reads from its standard input
CKPT_RUN = "runs/pt"  # CKPT: the README's own pretraining run (4 layers, as freeze=[layers.0-3] needs)

# Appended to every command of a verb (a later key=value or flag wins), so that the README's own arguments
# stay as written and only sizes shrink. Each entry says why it is there.
TINY = {
    # 3 minutes of a 192-wide model -> about a second of a 48-wide one (4 layers and context 128 kept,
    # so the finetune and generate examples meet the demo model a user would get)
    "demo": ["minutes=0.02", "dim=48", "batch_size=4"],
    # tokenizing 8 MB of stdlib code takes most of a minute; 200 KB takes a second
    "data prepare": ["default_bytes=200000"],
    # max_steps=5000 -> 4; torch.compile of the training step costs ~35 s on a CPU (compiled decoding
    # is still run, by the generate --compile example)
    "pretrain": ["max_steps=4", "system.compile=false"],
    # 300 steps -> 2; greedy exact match on 200 records -> 4 records of 8 tokens
    "finetune": ["max_steps=2", "batch_size=2", "eval.batches=1", "eval.exact_match=4", "eval.max_new_tokens=8"],
    # 60-150 steps -> 2 of 2 pairs or prompts; rollouts of 24 tokens -> 6; 200 before/after answers -> 4
    "align": ["max_steps=2", "batch_size=2", "eval.batches=1", "eval.answers=4", "rollout.max_new_tokens=6",
              "grpo.group_size=2"],
    # 2,000 / 200 / 200 records -> 24 / 4 / 4
    "data tasks": ["train=24", "val=4", "test=4"],
    # 200 instructions -> 2, in one round of 2 prompts of 16 tokens
    "data distill": ["instructions=2", "rounds=1", "prompts_per_round=2", "max_new_tokens=16", "code_samples=1"],
    # every document of every task -> 6 of each; 1000 bootstrap resamples -> 10
    "eval": ["limit=6", "bootstrap_iters=10"],
    # the default 16-run sweep (12 minutes) -> 6 runs of a few steps, the fewest that fit 5 constants
    # with one held out; the code corpus 8 MB -> 100 KB; 50 bootstrap refits -> 5
    "scaling fit": ["widths=[16,32,48]", "tokens=[2e3,4e3]", "corpus_bytes=100000", "seq_len=32", "batch_size=4",
                    "bootstrap=5"],
    # two runs of 2M tokens (10 minutes) -> two of 2K tokens at width 32; the code corpus 8 MB -> 100 KB
    "scaling moe": ["dim=32", "n_layers=1", "hidden_dim=64", "tokens=2048", "corpus_bytes=100000", "seq_len=32",
                    "batch_size=4", "evals=2", "eval_batches=2"],
}

# The user's own config.yaml for the pretraining examples: the same model as the first one's
# overrides (model.dim=384), so that `ckpt.resume=auto` continues that very run.
CONFIG_YAML = """\
data: runs/data
out_dir: runs/pt
seq_len: 32
batch_size: 4
model: {vocab_size: 512, dim: 384, n_layers: 4, n_heads: 4, n_kv_heads: 4, head_dim: 16, hidden_dim: 128,
        max_seq_len: 64}
optim: {warmup_steps: 1}
eval: {every: 2, batches: 2}
ckpt: {every: 2}
"""
# the reader's own lm-evaluation-harness task for `llmlab eval CKPT tasks=[my-tasks/]` (data_files relative
# to the task file's folder)
TASK_YAML = """\
task: words
dataset_path: json
dataset_kwargs: {data_files: {train: words.jsonl, test: words.jsonl}}
training_split: train
test_split: test
output_type: multiple_choice
doc_to_text: "Words: {{q}}. Next:"
doc_to_choice: choices
doc_to_target: label
"""
WORDS = ("the model reads tokens and learns which one comes next while loops walk over lists of "
         "items that a class defines with methods and a function returns values to its caller").split()


def _readme_commands() -> list[list[str]]:
    section = README.split("## The command line", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [argv for argv in (shlex.split(line, comments=True) for line in block.splitlines()) if argv]


def _make_inputs(root: Path) -> None:
    """The files the README leaves to its reader: docs/, more.jsonl, chats.jsonl, config.yaml."""
    rng = random.Random(0)

    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120)))

    (root / "docs").mkdir()
    for i in range(80):
        (root / "docs" / f"doc{i:02d}.txt").write_text(f"Note {i}. {text()}\n")
    (root / "more.jsonl").write_text("".join(json.dumps({"text": text()}) + "\n" for _ in range(40)))
    chats = [{"messages": [{"role": "user", "content": f"Name item {i}"},
                           {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(5))}]}
             for i in range(20)]
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (root / "config.yaml").write_text(CONFIG_YAML)
    (root / "my-tasks").mkdir()
    rows = [{"q": " ".join(rng.sample(WORDS, 4)), "choices": rng.sample(WORDS, 3), "label": i % 3} for i in range(12)]
    (root / "my-tasks" / "words.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "my-tasks" / "words.yaml").write_text(TASK_YAML)


def _make_adapter(base: str, out: Path) -> None:
    """A PEFT-format LoRA adapter for `base`, with a nonzero update so that merging it changes the weights."""
    import torch

    from llmlab.models.io import load_model
    from llmlab.peft import LoraConfig, apply_lora, save_adapter

    model = load_model(base)
    cfg = LoraConfig(r=4, targets=["q_proj", "v_proj"])
    apply_lora(model, cfg)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    save_adapter(model, out, cfg, base=base)


def _newest(folder: Path) -> str:
    steps = sorted(folder.glob("step-*"))
    assert steps, f"no checkpoint in {folder} for the README's step-<N>"
    return str(steps[-1])


def _resolve(argv: list[str], root: Path) -> list[str]:
    """The README's placeholders made real: /tmp/... inside `root`, configs/ the repository's,
    step-<N> the newest checkpoint, CKPT the README's own pretraining run's newest checkpoint, $KEY a key."""
    out = []
    for arg in argv:
        arg = re.sub(r"(^|=)/tmp/", r"\g<1>tmp/", arg)
        arg = re.sub(r"^configs/", lambda m: f"{ROOT / 'configs'}/", arg)  # the configs this clone ships
        if "step-<N>" in arg:
            arg = _newest(root / arg.split("step-<N>")[0])
        arg = re.sub(r"(^|=)CKPT$", lambda m: m.group(1) + _newest(root / CKPT_RUN / "checkpoints"), arg)
        out.append(arg.replace("$KEY", KEY))
    return out


def _verb(argv: list[str]) -> str:
    from llmlab.cli import CONFIG_VERBS

    rest = argv[argv.index("llmlab") + 1:]
    two = " ".join(rest[:2])
    return two if two in CONFIG_VERBS else rest[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_process(argv: list[str], capsys, stdin: str = "") -> tuple[int, str]:
    from llmlab.cli import main

    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        code = main(argv)
    except SystemExit as e:  # --help
        code = e.code
    finally:
        sys.stdin = old_stdin
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}


def _torchrun(argv: list[str], root: Path) -> tuple[int, str]:
    # 8 processes (one per GPU in the README) -> 2 on this 2-core CPU, over gloo: 8 take ~16 s instead
    # of ~4 s and show nothing 2 do not. A free rendezvous port, since other tests may hold 29500.
    argv = list(argv)
    argv[argv.index("--nproc_per_node") + 1] = "2"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--master_port={_free_port()}", *argv[1:]]
    proc = subprocess.run(cmd, cwd=root, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def _serve(argv: list[str], root: Path, port: int) -> tuple[int, str]:
    """Complete one prompt with the openai client from the server the command starts."""
    import openai

    def check(url: str) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        reply = client.completions.create(model=model, prompt="def", max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason in ("length", "stop"), reply

    return _server(argv, root, port, check)


def _studio(argv: list[str], root: Path, port: int) -> tuple[int, str]:
    """Log in to the studio the command starts, with the account the README made, and load the runs page."""
    try:
        import httpx
    except ImportError:  # openai 3 ships its HTTP client as httpx2
        import httpx2 as httpx

    def check(url: str) -> None:
        client = httpx.Client(base_url=url, timeout=30)
        assert client.post("/login", data={"name": "ann", "password": STUDIO_PASSWORD}).status_code == 303
        page = client.get("/", headers={"accept": "text/html"})
        assert page.status_code == 200 and "Runs" in page.text, page.text[:500]

    return _server(argv, root, port, check)


def _server(argv: list[str], root: Path, port: int, check) -> tuple[int, str]:
    """Start a server command, wait for /health, run `check(url)`, stop it with SIGINT; returns the exit
    status (0, or 130 for an interrupt, is clean) and the output."""
    name = argv[argv.index("llmlab") + 1]
    cmd = [sys.executable, "-m", "llmlab", *argv[1:]]
    proc = subprocess.Popen(cmd, cwd=root, env=_subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, f"{name} exited with {proc.returncode} before answering /health"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, f"{name} did not answer /health within 60 s"
            time.sleep(0.25)
        check(f"http://127.0.0.1:{port}")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out


@pytest.mark.slow
def test_command_line_examples_run(tmp_path, monkeypatch, capsys):
    """Every command of the README's command-line section, in order, in one folder: later commands
    read what earlier ones wrote. Each must exit 0 with no traceback and no internal error."""
    pytest.importorskip("openai")
    commands = _readme_commands()
    assert len(commands) == 50, [" ".join(c) for c in commands]
    monkeypatch.chdir(tmp_path)
    _make_inputs(tmp_path)
    log, failures = [], []
    for readme_argv in commands:
        start = time.time()
        argv = _resolve(readme_argv, tmp_path)
        verb = _verb(argv)
        argv += TINY.get(verb, [])
        studio = verb == "studio" and "user" not in argv
        if verb == "serve" or studio:
            port = _free_port()
            argv += ["--port", str(port)]  # the README's 8000 (7860) may be taken on this machine
        if "peft-adapter/" in argv and not (tmp_path / "peft-adapter").exists():
            _make_adapter(argv[argv.index("convert") + 1], tmp_path / "peft-adapter")
        try:
            if argv[0] == "torchrun":
                code, output = _torchrun(argv, tmp_path)
            elif verb == "serve":
                code, output = _serve(argv, tmp_path, port)
            elif studio:
                code, output = _studio(argv, tmp_path, port)
            else:  # in-process: a subprocess would cost ~2 s of importing torch per command
                stdin = {"chat": "Hello there\n/exit\n", "studio": STUDIO_PASSWORD + "\n"}.get(verb, "")
                code, output = _in_process(argv[1:], capsys, stdin=stdin)
        except Exception as e:  # a failed check of serve's, or a bug the CLI let through: report, go on
            code, output = None, f"{type(e).__name__}: {e}"
        ok = code in ((0, 130) if verb == "serve" or studio else (0,)) and "Traceback" not in output \
            and "internal error" not in output
        log.append(f"{'ok  ' if ok else 'FAIL'} {time.time() - start:5.1f}s  $ {shlex.join(readme_argv)}")
        if not ok:
            failures.append(f"$ {shlex.join(readme_argv)}\n  exit {code}: {output.strip()[-800:]}")
    assert not failures, (f"{len(failures)} of {len(commands)} README commands failed:\n" + "\n".join(failures)
                          + "\n\nall commands:\n" + "\n".join(log))
