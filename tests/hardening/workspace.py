"""The workspace the hardening tables run in: tiny fixtures built once per session with llmlab's own
API, named by placeholders (`{ckpt}`, `{run}`, ...) that the tables use, and a byte-for-byte
snapshot that tells whether a command changed anything in it."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import stat
from pathlib import Path

import yaml

WORDS = ("the model reads tokens and predicts the next one while the loss falls slowly over many steps "
         "data shards hold ids a tokenizer maps bytes to pieces and back").split()
DEEP = 100_000  # nesting that exceeds Python's recursion limit in any recursive reader
UNCREATABLE = "/proc/llmlab"  # a location nothing can be created in, even by root


def build(root: Path) -> dict[str, str]:
    """Build every fixture under `root` (a few seconds); returns placeholder name -> absolute path (or value)."""
    import torch

    from llmlab.config import load_config
    from llmlab.data.prepare import PrepareConfig, TokenizerTrainConfig, run as prepare, train_tokenizer
    from llmlab.data.synth import SynthConfig, run as synth
    from llmlab.models import GPTConfig, LlamaConfig, build_model
    from llmlab.models.io import copy_tokenizer_files, save_hf, save_model
    from llmlab.peft import LoraConfig, apply_lora, save_adapter
    from llmlab.tokenizer import load_tokenizer
    from llmlab.train.finetune import FinetuneConfig, run as finetune
    from llmlab.train.pretrain import PretrainConfig, run as pretrain

    root.mkdir(parents=True, exist_ok=True)
    p: dict[str, str] = {"ws": str(root), "ro": UNCREATABLE, "new": str(root / "new"), "missing": str(root / "missing")}

    def path(name: str, rel: str) -> Path:
        p[name] = str(root / rel)
        return root / rel

    rng = random.Random(0)
    corpus = path("corpus", "corpus")
    corpus.mkdir()
    for i in range(60):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 160)))
        (corpus / f"doc{i:03d}.txt").write_text(f"Document {i}.\n{text}\n")
    tok = Path(train_tokenizer(TokenizerTrainConfig(inputs=[str(corpus)], out_dir=str(path("tok", "tok")),
                                                    vocab_size=320))).parent
    prepare(PrepareConfig(inputs=[str(corpus)], out_dir=str(path("data", "data")), tokenizer=str(tok), val_frac=0.2,
                          seed=0))
    vocab = load_tokenizer(tok).vocab_size

    torch.manual_seed(0)
    llama = LlamaConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=128)
    model = build_model(llama)
    ckpt = path("ckpt", "ckpt")
    save_model(model, ckpt)
    copy_tokenizer_files(tok, ckpt)
    hf = path("hf", "hf")
    save_hf(model, hf)
    copy_tokenizer_files(tok, hf)
    gpt = path("gpt", "gpt")
    save_model(build_model(GPTConfig(vocab_size=vocab, dim=32, n_layers=1, n_heads=2, max_seq_len=64)), gpt)
    copy_tokenizer_files(tok, gpt)

    lora = LoraConfig(r=2, alpha=4.0, targets=["q_proj", "v_proj"])
    adapted = build_model(llama)
    apply_lora(adapted, lora)
    save_adapter(adapted, path("adapter", "adapter"), lora, base=str(ckpt))
    mismatched = path("bad_adapter", "bad_adapter")  # its config names modules its tensors do not hold
    shutil.copytree(root / "adapter", mismatched)
    config = json.loads((mismatched / "adapter_config.json").read_text())
    config["target_modules"] = ["k_proj", "o_proj"]
    (mismatched / "adapter_config.json").write_text(json.dumps(config))
    wide = build_model(LlamaConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=64))
    apply_lora(wide, lora)
    save_adapter(wide, path("other_adapter", "other_adapter"), lora)  # for another base's shapes

    synth(SynthConfig(out_dir=str(path("synth", "synth")), train=40, val=6, test=4, tasks=["reverse", "upper"]))
    p["train_jsonl"] = str(root / "synth" / "train.jsonl")
    p["val_jsonl"] = str(root / "synth" / "val.jsonl")
    for name, fmt in (("pref", "preference"), ("prompts", "prompt")):
        synth(SynthConfig(out_dir=str(path(name, name)), train=24, val=4, test=0, tasks=["reverse"], format=fmt))
        p[f"{name}_jsonl"] = str(root / name / "train.jsonl")
    path("same_pair", "same_pair.jsonl").write_text(
        json.dumps({"prompt": "Reverse: a b", "chosen": "b a", "rejected": "b a"}) + "\n")
    path("one_sided", "one_sided.jsonl").write_text(json.dumps({"prompt": "Reverse: a b", "chosen": "b a"}) + "\n")

    # configs whose own values are fine: a table case adds the one bad value
    pt = _yaml(path("pt", "pt.yaml"), {
        "data": p["data"], "out_dir": str(root / "new_pt"), "seq_len": 16, "batch_size": 2, "max_steps": 2,
        "log_every": 1, "model": {"family": "llama", "vocab_size": vocab, "dim": 32, "n_layers": 2, "n_heads": 4,
                                  "n_kv_heads": 4, "head_dim": 8, "hidden_dim": 64, "max_seq_len": 32},
        "optim": {"warmup_steps": 1}, "eval": {"every": 2, "batches": 1}, "ckpt": {"every": 1},
        "system": {"device": "cpu"}})
    bad = yaml.safe_load(pt.read_text())
    bad["optim"]["lr"] = 0
    _yaml(path("pt_zero_lr", "pt_zero_lr.yaml"), bad)  # a bad value in the file, not on the command line
    ft = _yaml(path("ft", "ft.yaml"), {
        "base": p["ckpt"], "out_dir": str(root / "new_ft"), "data": {"train": p["train_jsonl"], "val": p["val_jsonl"]},
        "seq_len": 128, "batch_size": 2, "max_steps": 2, "log_every": 1, "optim": {"warmup_steps": 1},
        "eval": {"every": 2, "batches": 1}, "ckpt": {"every": 1}, "lora": {"r": 2}, "system": {"device": "cpu"}})
    _yaml(path("al", "al.yaml"), {
        "method": "dpo", "base": p["ckpt"], "out_dir": str(root / "new_al"), "data": {"train": p["pref_jsonl"]},
        "seq_len": 64, "batch_size": 2, "max_steps": 2, "log_every": 1, "optim": {"warmup_steps": 1},
        "eval": {"every": 2, "batches": 1, "answers": 2}, "ckpt": {"every": 1}, "lora": {"r": 2},
        "rollout": {"max_new_tokens": 4}, "grpo": {"group_size": 2}, "system": {"device": "cpu"}})
    _yaml(path("sf", "sf.yaml"), {
        "out_dir": str(root / "new_sf"), "data": p["data"], "widths": [16, 32], "tokens": [64, 128, 192],
        "seq_len": 16, "batch_size": 2, "bootstrap": 2})
    _yaml(path("sm", "sm.yaml"), {
        "out_dir": str(root / "new_sm"), "data": p["data"], "dim": 32, "n_layers": 1, "hidden_dim": 32,
        "experts": {"n_experts": 2, "top_k": 2}, "tokens": 64, "seq_len": 16, "batch_size": 2, "evals": 2,
        "eval_batches": 1})

    # a pretraining run with two checkpoints, and a fine-tuning run with one
    pretrain(load_config(PretrainConfig, pt, [f"out_dir={root / 'run'}"]))
    p["run"] = str(root / "run")
    p["run_ckpt"] = str(root / "run" / "checkpoints" / "step-00000002")
    p["run_config"] = str(root / "run" / "config.yaml")
    finetune(load_config(FinetuneConfig, ft, [f"out_dir={root / 'ft_run'}", "max_steps=1"]))
    p["ft_run"] = str(root / "ft_run")
    p["ft_config"] = str(root / "ft_run" / "config.yaml")

    # damaged data: a flipped byte (checksum), ids past the vocabulary (with a right checksum)
    flipped = path("flipped", "flipped")
    shutil.copytree(root / "data", flipped)
    shard = flipped / "train_0000.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 1
    shard.write_bytes(bytes(raw))
    bigids = path("bigids", "bigids")
    shutil.copytree(root / "data", bigids)
    shard = bigids / "train_0000.bin"
    raw = bytearray(shard.read_bytes())
    raw[10:12] = (60000).to_bytes(2, "little")
    shard.write_bytes(bytes(raw))
    manifest = json.loads((bigids / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(raw).hexdigest()
    (bigids / "manifest.json").write_text(json.dumps(manifest, indent=2))

    # damaged checkpoints
    for name, damage in (("ck_badjson", lambda d: (d / "config.json").write_text("{not json")),
                         ("ck_deep", lambda d: (d / "config.json").write_text("[" * DEEP + "]" * DEEP)),
                         ("ck_latin1", lambda d: (d / "config.json").write_bytes(b'{"llmlab": "caf\xe9"}')),
                         ("ck_noweights", lambda d: (d / "model.safetensors").unlink()),
                         ("ck_truncated", lambda d: _truncate(d / "model.safetensors")),
                         ("ck_dim0", lambda d: _edit_config(d, dim=0)),
                         ("ck_layers0", lambda d: _edit_config(d, n_layers=0)),
                         ("ck_mismatch", lambda d: _edit_config(d, hidden_dim=128))):
        folder = path(name, name)
        shutil.copytree(ckpt, folder)
        damage(folder)

    # a user's precious things, and files that are wrong in every way a file can be
    path("precious", "precious").mkdir()
    (root / "precious" / "notes.txt").write_text("years of work\n")
    p["precious_file"] = str(root / "precious" / "notes.txt")
    path("file", "plain.txt").write_text("just a file\n")
    os.symlink("cycle", path("loop", "cycle"))  # a symlink to itself
    path("deep_jsonl", "deep.jsonl").write_text('{"text": ' + "[" * DEEP + "]" * DEEP + "}\n")
    path("deep_json", "deep.json").write_text("[" * DEEP + "]" * DEEP)
    path("deep_yaml", "deep.yaml").write_text("a: " + "[" * DEEP + "]" * DEEP + "\n")
    path("deep_jinja", "deep.jinja").write_text("{% if true %}" * 5000 + "x" + "{% endif %}" * 5000)
    path("latin1_txt", "latin1.txt").write_bytes(b"caf\xe9 au lait, " * 20 + b"\n")
    path("latin1_jsonl", "latin1.jsonl").write_bytes(b'{"text": "caf\xe9 au lait and more words to keep"}\n')
    path("latin1_yaml", "latin1.yaml").write_bytes(b"out_dir: caf\xe9\n")
    path("latin1_jinja", "latin1.jinja").write_bytes(b"{{ messages[0].content }} caf\xe9")
    path("empty_txt", "empty.txt").write_text("")
    # an integer of more than the 4,300 digits Python converts from text
    p["digits"] = "9" * 5000
    path("bigint_yaml", "bigint.yaml").write_text(f"max_steps: {p['digits']}\n")
    path("bigint_jsonl", "bigint.jsonl").write_text(f'{{"text": "a fine document of words", "n": {p["digits"]}}}\n')
    path("empty_jsonl", "empty.jsonl").write_text("")
    path("empty_yaml", "empty.yaml").write_text("")
    path("empty_jinja", "empty.jinja").write_text("")
    path("binary_txt", "binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    path("list_yaml", "list.yaml").write_text("- 1\n- 2\n")
    path("bad_jsonl", "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    path("nontext_jsonl", "nontext.jsonl").write_text('{"text": 5}\n')
    path("wrong_records", "wrong.jsonl").write_text('{"question": "what?", "answer": "this"}\n')
    # nested loops, each under the sandbox's range limit, whose product is far above any budget
    path("runaway", "runaway.jinja").write_text(
        "{% for a in range(50000) %}{% for b in range(50000) %}{% for c in range(50000) %}x"
        "{% endfor %}{% endfor %}{% endfor %}")
    path("prompts_latin1", "prompts.latin1").write_bytes(b"caf\xe9\n")
    return p


def _yaml(file: Path, data: dict) -> Path:
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    return file


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:100])


def _edit_config(folder: Path, **fields) -> None:
    data = json.loads((folder / "config.json").read_text())
    data["llmlab"].update(fields)
    (folder / "config.json").write_text(json.dumps(data))


def busy_port() -> tuple[socket.socket, int]:
    """A listening socket on loopback (keep it open): its port is in use."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


# --------------------------------------------------------------------------- snapshots


def snapshot(root: Path) -> dict[str, tuple]:
    """Relative path -> (kind, size, sha256 or link target) for everything under `root`, symlinks
    not followed. Equal snapshots mean nothing was added, removed or changed."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", st.st_size, hashlib.sha256(full.read_bytes()).hexdigest())
    return out


def difference(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """What changed between two snapshots, one readable line per path."""
    lines = [f"new: {k}" for k in sorted(after.keys() - before.keys())]
    lines += [f"removed: {k}" for k in sorted(before.keys() - after.keys())]
    lines += [f"changed: {k}" for k in sorted(before.keys() & after.keys()) if before[k] != after[k]]
    return lines


def restore(root: Path, pristine: Path) -> None:
    """Make `root` a copy of `pristine` again (after a case that changed it)."""
    shutil.rmtree(root)
    shutil.copytree(pristine, root, symlinks=True)


PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]*)\}")


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace `{name}` by its value; an unknown name is an error in the table, not a silent literal."""
    def one(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"unknown placeholder {{{m.group(1)}}}; known: {', '.join(sorted(values))}")
        return values[m.group(1)]

    return PLACEHOLDER.sub(one, text)
