"""`llmlab align` end to end on CPU: every method runs, logs and exports; exact resume; non-finite
rewards; checkers that fail; bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from llmlab.align.config import AlignConfig
from llmlab.align.rollout import check_rewards
from llmlab.align.run import run
from llmlab.cli import main
from llmlab.common import LlmlabError
from llmlab.config import from_dict
from llmlab.models.io import load_model
from llmlab.tokenizer import load_tokenizer
from llmlab.train.checkpoint import list_checkpoints

PAIRS = ("rm", "dpo", "ipo")


def _cfg(base, data, out_dir, method, **overrides) -> AlignConfig:
    pairs = method in PAIRS
    cfg = {"method": method, "base": str(base), "out_dir": str(out_dir),
           "data": {"train": str(data / ("pairs.jsonl" if pairs else "prompts.jsonl")),
                    "val": str(data / ("pairs-val.jsonl" if pairs else "prompts-val.jsonl"))},
           "batch_size": 4, "max_steps": 4, "optim": {"lr": 1e-2, "warmup_steps": 1},
           "lora": {"r": 4, "alpha": 8, "targets": ["all-linear"]},
           "rollout": {"max_new_tokens": 6}, "grpo": {"group_size": 4}, "ppo": {"epochs": 2, "mini_batches": 2},
           "eval": {"every": 2, "batches": 2, "answers": 6}, "ckpt": {"every": 2, "keep_last": 5},
           "system": {"autocast": "none"}}  # fp32 on every machine: exact comparisons across runs
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(AlignConfig, cfg)


def _metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _steady(lines):
    return [{k: v for k, v in r.items() if not k.endswith(("_per_s", "_s")) and k != "time"} for r in lines]


EXPECTED = {
    "rm": {"loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "response_length"},
    "dpo": {"loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "response_length", "entropy"},
    "ipo": {"loss", "accuracy", "margin", "entropy"},
    "ppo": {"loss", "reward", "kl", "entropy", "response_length", "policy_loss", "value_loss", "clip_fraction"},
    "grpo": {"loss", "reward", "kl", "entropy", "response_length", "clip_fraction"},
}


@pytest.mark.parametrize("method", list(EXPECTED))
def test_every_method_trains_logs_reports_and_exports(chat_base, align_data, tmp_path, method):
    result = run(_cfg(chat_base, align_data, tmp_path, method))
    assert result["step"] == 4 and result["exit_code"] == 0 and result["stopped"] == "max_steps"
    lines = _metrics(tmp_path)
    train = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(EXPECTED[method] <= set(r) for r in train), set(train[0])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert [r["step"] for r in lines if "val_loss" in r] == [2, 4]
    report = json.loads((tmp_path / "report.json").read_text())
    if method == "rm":
        assert 0 <= report["accuracy"] <= 1 and report["pairs"] == 16
        model = load_model(tmp_path / "final")
        assert model.config.num_labels == 1 and model.lm_head.weight.shape[0] == 1
    else:
        assert report["prompts"] == 6 and 0 <= report["win_rate"] <= 1
        assert set(report["exact_match"]["reverse"]) == {"before", "after"}
        assert load_model(tmp_path / "final").config.num_labels == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_a_reward_model_exports_in_hf_sequence_classification_layout(chat_base, align_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    run(_cfg(chat_base, align_data, tmp_path / "rm", "rm", peft="none"))
    ours = load_model(tmp_path / "rm" / "final")
    assert main(["convert", str(tmp_path / "rm" / "final"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    pad = config["pad_token_id"]
    assert pad == load_tokenizer(tmp_path / "rm" / "final").pad_id
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[5, 9, 17, 30, 41], [7, 8, 9, pad, pad]])  # HF reads each row at its last real token
    with torch.no_grad():
        scores = hf(ids, attention_mask=(ids != pad).long()).logits[:, 0]
        assert torch.allclose(scores[0], ours(ids[:1])[0, -1, 0], atol=1e-5)
        assert torch.allclose(scores[1], ours(ids[1:, :3])[0, -1, 0], atol=1e-5)
    assert load_model(tmp_path / "hf").config.num_labels == 1  # and back


@pytest.mark.parametrize("method", ["rm", "dpo", "ppo", "grpo"])
def test_resume_is_exact(chat_base, align_data, tmp_path, method):
    peft = {"peft": "none"} if method == "dpo" else {}  # dpo: also the reference read again from the base
    whole = tmp_path / "whole"
    run(_cfg(chat_base, align_data, whole, method, **peft))
    part = tmp_path / "part"
    run(_cfg(chat_base, align_data, part, method, **peft))
    # as if killed right after the step-2 checkpoint: later checkpoints and outputs never happened
    shutil.rmtree(part / "checkpoints" / "step-00000004")
    for name in ("final", "adapter", "report.json"):
        shutil.rmtree(part / name, ignore_errors=True) if name != "report.json" else (part / name).unlink()
    run(_cfg(chat_base, align_data, part, method, **peft, **{"ckpt.resume": "auto"}))
    assert _steady(_metrics(part)) == _steady(_metrics(whole))
    a, b = (load_model(d / "final").state_dict() for d in (whole, part))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_sigkill_gives_the_same_losses(chat_base, align_data, tmp_path):
    import signal
    import time

    from llmlab.config import save_config

    steps = {"max_steps": 6, "ckpt.every": 2, "eval.every": 6}
    whole = tmp_path / "whole"
    run(_cfg(chat_base, align_data, whole, "grpo", **steps))
    cfg = _cfg(chat_base, align_data, tmp_path / "killed", "grpo", **steps)
    save_config(cfg, tmp_path / "killed.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "llmlab", "align", str(tmp_path / "killed.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = tmp_path / "killed" / "checkpoints" / "step-00000004"
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists()
    resumed = run(_cfg(chat_base, align_data, tmp_path / "killed", "grpo", **steps, **{"ckpt.resume": "auto"}))
    assert resumed["step"] == 6
    losses = [(r["step"], r["loss"]) for r in _metrics(tmp_path / "killed") if "loss" in r]
    assert losses == [(r["step"], r["loss"]) for r in _metrics(whole) if "loss" in r]


def test_ppo_with_a_reward_model_and_ptx(chat_base, align_data, tmp_path):
    run(_cfg(chat_base, align_data, tmp_path / "rm", "rm", peft="none"))
    result = run(_cfg(chat_base, align_data, tmp_path / "ppo", "ppo", **{
        "reward.model": str(tmp_path / "rm" / "final"), "ppo.ptx_coef": 0.5,
        "ppo.ptx_data": str(align_data / "text.jsonl")}))
    assert result["report"]["judge"] == "reward model"
    train = [r for r in _metrics(tmp_path / "ppo") if "loss" in r]
    assert all("ptx_loss" in r and r["ptx_loss"] > 0 for r in train)


def nan_checker(prompt, completion, answer):
    return float("nan")


def raising_checker(prompt, completion, answer):
    if len(completion) % 2:
        raise RuntimeError("the checker failed")
    return 1.0


def test_a_non_finite_reward_stops_the_run_without_a_checkpoint(chat_base, align_data, tmp_path):
    cfg = _cfg(chat_base, align_data, tmp_path, "grpo", **{"reward.checker": f"{__name__}:nan_checker"})
    with pytest.raises(LlmlabError, match="non-finite reward"):
        run(cfg)
    assert list_checkpoints(tmp_path / "checkpoints") == []
    skipped = run(_cfg(chat_base, align_data, tmp_path / "skip", "grpo", nonfinite="skip",
                       **{"reward.checker": f"{__name__}:nan_checker", "data.val": "", "data.val_fraction": 0.0}))
    assert skipped["skipped"] == 4
    assert [r["skipped_nonfinite"] for r in _metrics(tmp_path / "skip")] == [1, 2, 3, 4]


def test_a_checker_that_raises_is_counted_not_fatal(chat_base, align_data, tmp_path):
    run(_cfg(chat_base, align_data, tmp_path, "grpo", **{"reward.checker": f"{__name__}:raising_checker"}))
    train = [r for r in _metrics(tmp_path) if "loss" in r]
    assert len(train) == 4 and sum(r["checker_failures"] for r in train) > 0


def broken_checker(prompt, completion, answer):
    raise KeyError("expected")


def test_a_checker_that_scores_nothing_is_an_error_naming_its_failure(chat_base, align_data, tmp_path):
    cfg = _cfg(chat_base, align_data, tmp_path, "grpo", **{"reward.checker": f"{__name__}:broken_checker"})
    with pytest.raises(LlmlabError, match=r"scored none of the \d+ answers of step 1 \(KeyError: 'expected'\)"):
        run(cfg)
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_check_rewards_takes_any_real_number_and_survives_what_a_checker_does():
    import time

    import numpy as np

    def checker(prompt, completion, answer):
        if completion == "sleep":
            time.sleep(30)
        if completion == "exit":
            raise SystemExit(3)
        return {"np": np.float32(0.5), "tensor": torch.tensor([2.0]), "huge": 10**400, "-huge": -10**400,
                "true": True, "text": "1.0"}[completion]

    texts = ["np", "tensor", "huge", "-huge", "true", "text", "sleep", "exit"]
    started = time.perf_counter()
    rewards, valid, failures = check_rewards(checker, [""] * len(texts), texts, [None] * len(texts), timeout=0.5)
    assert time.perf_counter() - started < 10
    assert rewards[:5].tolist() == [0.5, 2.0, float("inf"), float("-inf"), 1.0]
    assert valid.tolist() == [True] * 5 + [False] * 3
    assert failures == ["returned str, not a number", "CheckTimeout: took over 0.5 s (reward.timeout)",
                        "SystemExit: 3"]


def test_exact_match_needs_every_prompt_to_have_an_answer(chat_base, align_data, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Reverse: a b c", "answer": "c b a"}) + "\n"
                       + "".join(json.dumps({"prompt": f"Reverse: {x}"}) + "\n" for x in "abcdef"))
    cfg = _cfg(chat_base, align_data, tmp_path / "out", "grpo", **{"data.train": str(prompts)})
    with pytest.raises(LlmlabError, match=r"prompts.jsonl: 6 of 7 prompts have no `answer` \(the first at "
                                          r".*prompts.jsonl:2\)"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_resume_refuses_other_adapter_settings(chat_base, align_data, tmp_path):
    run(_cfg(chat_base, align_data, tmp_path, "dpo", max_steps=2))
    for override, saved in (({"lora.alpha": 4}, "alpha=8"), ({"lora.r": 2}, "r=4"),
                            ({"lora.targets": ["q_proj"]}, "all-linear"), ({"peft": "none"}, "peft=none")):
        overrides = {"max_steps": 3, "ckpt.resume": "auto", **override}
        with pytest.raises(LlmlabError, match="set it back") as e:
            run(_cfg(chat_base, align_data, tmp_path, "dpo", **overrides))
        assert saved in str(e.value) and len(str(e.value)) < 400


@pytest.mark.parametrize("override, message", [
    ({"reward.checker": "no_such_module_xyz:f"}, "cannot import"),
    ({"reward.checker": "json:no_such_function"}, "has no 'no_such_function'"),
    ({"rollout.max_new_tokens": 200}, "leaves no room for a prompt"),
    ({"seq_len": 500}, "exceeds the base model's context"),
])
def test_bad_settings_are_named(chat_base, align_data, tmp_path, override, message):
    with pytest.raises(LlmlabError, match=message):
        run(_cfg(chat_base, align_data, tmp_path, "grpo", **override))


def test_a_reward_model_must_share_the_policy_tokenizer(chat_base, align_data, tmp_path):
    from llmlab.data.prepare import TokenizerTrainConfig, train_tokenizer
    from llmlab.models.io import copy_tokenizer_files

    run(_cfg(chat_base, align_data, tmp_path / "rm", "rm", peft="none"))
    (tmp_path / "other.txt").write_text("a different corpus gives a different vocabulary " * 50)
    other = train_tokenizer(TokenizerTrainConfig(inputs=[str(tmp_path / "other.txt")], out_dir=str(tmp_path / "tok"),
                                                 vocab_size=280))
    copy_tokenizer_files(other.parent, tmp_path / "rm" / "final")
    with pytest.raises(LlmlabError, match="tokenizer differs"):
        run(_cfg(chat_base, align_data, tmp_path / "ppo", "ppo", **{"reward.model": str(tmp_path / "rm" / "final")}))
    with pytest.raises(LlmlabError, match="not a reward model"):
        run(_cfg(chat_base, align_data, tmp_path / "ppo2", "ppo", **{"reward.model": str(chat_base)}))


def test_dpo_reference_from_adapters_needs_lora(chat_base, align_data, tmp_path):
    with pytest.raises(LlmlabError, match="needs peft=lora"):
        run(_cfg(chat_base, align_data, tmp_path, "dpo", peft="none", **{"dpo.reference": "adapters"}))
    # both references give the same losses with LoRA: the adapters start at zero
    a = run(_cfg(chat_base, align_data, tmp_path / "a", "dpo", **{"dpo.reference": "adapters"}))
    b = run(_cfg(chat_base, align_data, tmp_path / "b", "dpo"))
    la = [r["loss"] for r in _metrics(tmp_path / "a") if "loss" in r]
    lb = [r["loss"] for r in _metrics(tmp_path / "b") if "loss" in r]
    assert la == pytest.approx(lb, abs=1e-5) and a["step"] == b["step"]


def test_the_cli_runs_align_and_refuses_an_existing_run(chat_base, align_data, tmp_path):
    from llmlab.config import save_config

    save_config(_cfg(chat_base, align_data, tmp_path / "run", "dpo", max_steps=2), tmp_path / "c.yaml")
    cmd = [sys.executable, "-m", "llmlab", "align", str(tmp_path / "c.yaml")]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 1 and "already holds checkpoints" in again.stderr
    assert "Traceback" not in again.stderr
    bad = subprocess.run(cmd + ["method=sft"], capture_output=True, text=True)
    assert bad.returncode != 0 and "method" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_dpo_on_two_ranks_equals_one_process_accumulating_their_batches(chat_base, align_data, tmp_path):
    """Under torchrun (two CPU processes, Gloo) each rank takes its own micro-batch of pairs: the losses
    equal one process accumulating both, and only rank 0 prints."""
    from llmlab.config import save_config

    common = {"batch_size": 2, "eval.every": 4, "eval.answers": 2}
    run(_cfg(chat_base, align_data, tmp_path / "single", "dpo", grad_accum=2, **common))
    cfg = _cfg(chat_base, align_data, tmp_path / "ddp", "dpo", **common)
    save_config(cfg, tmp_path / "ddp.yaml")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "llmlab", "align", str(tmp_path / "ddp.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("stopped after step 4") == 1 and out.stdout.count("data: ") == 1
    single, ddp = _metrics(tmp_path / "single"), _metrics(tmp_path / "ddp")
    assert [r["step"] for r in single] == [r["step"] for r in ddp]
    for a, b in zip(single, ddp):
        for key in ("loss", "margin", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
