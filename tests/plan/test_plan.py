"""The planner against published figures, hand-computed memory, and its errors."""

from __future__ import annotations

import json
import os

import pytest

from llmlab.cli import main
from llmlab.models.presets import get_preset
from llmlab.plan import estimate as est
from llmlab.plan.hardware import CATALOG, get_hardware
from llmlab.plan.scaling import (CHINCHILLA, CHINCHILLA_REFIT, config_for_params, kaplan_optimal,
                                 tokens_per_param_optimal)

GOPHER_FLOPS = 5.76e23  # Hoffmann et al. 2022, Table 3: Gopher's training compute


def plan_json(capsys, *args) -> dict:
    assert main(["plan", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_gpt3_training_compute(capsys):
    # Brown et al. 2020, Table D.1: GPT-3 175B on 300B tokens, 3.14e23 FLOPs = 3,640 petaflop/s-days
    out = plan_json(capsys, "gpt3-175b", "--tokens", 300e9)
    assert out["flops_6nd"] == pytest.approx(3.14e23, rel=0.01)
    assert est.pf_days(out["flops_6nd"]) == pytest.approx(3640, rel=0.01)
    assert out["flops"] == pytest.approx(3.14e23, rel=0.05)  # plus attention at 2048 tokens (~3%)


def test_chinchilla_allocation_for_gophers_budget():
    # Hoffmann et al. 2022: Gopher's compute is best spent on ~70B parameters and ~1.4T tokens (Chinchilla)
    n, d = tokens_per_param_optimal(GOPHER_FLOPS)
    assert n == pytest.approx(70e9, rel=0.03) and d == pytest.approx(1.4e12, rel=0.03)
    n, d = CHINCHILLA_REFIT.optimal(GOPHER_FLOPS)  # Besiroglu et al. 2024's refit agrees
    assert n == pytest.approx(70e9, rel=0.05) and d == pytest.approx(1.4e12, rel=0.07)
    n, d = CHINCHILLA.optimal(GOPHER_FLOPS)  # the published Approach 3 constants favour more data
    assert 25e9 < n < 45e9 and 6 * n * d == pytest.approx(GOPHER_FLOPS)
    n, _ = kaplan_optimal(GOPHER_FLOPS)  # Kaplan et al.'s law spends far more on parameters
    assert n > 300e9


def test_the_parametric_optimum_is_the_minimum_on_the_budget_line():
    n, d = CHINCHILLA.optimal(1e21)
    best = CHINCHILLA.loss(n, d)
    for f in (0.7, 0.9, 1.1, 1.4):
        assert CHINCHILLA.loss(n * f, d / f) > best


def test_weights_of_one_billion_parameters():
    assert est.weight_bytes(1e9, "fp32") == 4e9
    assert est.weight_bytes(1e9, "bf16") == 2e9
    assert est.weight_bytes(1e9, "int8") == 1e9
    assert est.weight_bytes(1e9, "4bit") == pytest.approx(0.516e9, rel=0.01)


def test_bloomberggpt_schedule():
    # Wu et al. 2023, BloombergGPT: 50.6B parameters, 569B tokens, 64 x 8 A100 40GB for ~53 days,
    # i.e. ~0.65M A100-hours; their reported schedule implies ~25% of the bf16 peak
    shape = est.shape_of(config_for_params(50.6e9))
    per_token = 6 * shape.params + 12 * 70 * 7680 * 2048  # 70 layers of width 7680, 2048-token context
    run = est.run_cost(est.training_flops(per_token, 569e9), CATALOG["a100-40gb"].peak_flops, devices=512,
                       mfu=0.25)
    assert run.device_hours == pytest.approx(0.65e6, rel=0.05)
    assert run.hours / 24 == pytest.approx(53, rel=0.05)


def test_kv_cache_hand_computed():
    shape = est.shape_of(get_preset("llama-2-70b"))  # 80 layers, 8 KV heads of 128
    assert est.kv_cache_bytes(shape, 1, 4096, "bf16") == 2 * 80 * 8 * 128 * 4096 * 2  # 1.34 GB


def test_training_memory_by_component():
    shape = est.shape_of(get_preset("llama-7b"))
    p = shape.params
    full = est.training_memory(shape, batch=1, seq_len=2048)
    # mixed-precision Adam: 2 + 2 + 12 bytes per parameter (Rajbhandari et al. 2020, ZeRO)
    assert full.weights + full.gradients + full.master_weights + full.optimizer == 16 * p
    fp32 = est.training_memory(shape, batch=1, seq_len=2048, precision="fp32")
    assert fp32.weights + fp32.gradients + fp32.optimizer == 16 * p and fp32.master_weights == 0
    assert fp32.activations == 2 * full.activations
    sharded = est.training_memory(shape, batch=1, seq_len=2048, zero_stage=3, devices=8)
    assert sharded.weights + sharded.gradients + sharded.master_weights + sharded.optimizer == 2 * p
    ckpt = est.training_memory(shape, batch=1, seq_len=2048, checkpointing=True)
    assert ckpt.activations < full.activations / 10
    lora = est.training_memory(shape, batch=1, seq_len=2048, lora_rank=8)
    assert lora.trainable_params == est.lora_params(shape, 8) < p / 100
    assert lora.optimizer == 8 * lora.trainable_params
    qlora = est.training_memory(shape, batch=1, seq_len=2048, lora_rank=8, qlora=True)
    assert qlora.weights == pytest.approx(p * 4.127 / 8 + 2 * lora.trainable_params)
    # a CPU process also holds torch's kernels and the freed activation memory glibc keeps
    cpu = est.training_memory(shape, batch=1, seq_len=2048, precision="fp32", cpu=True)
    assert full.runtime == fp32.runtime == 0
    assert cpu.runtime == est.CPU_RUNTIME_BYTES + est.CPU_ALLOCATOR_RETENTION * cpu.activations
    assert cpu.total == pytest.approx(fp32.total + cpu.runtime)


def test_config_for_params_lands_near_the_count():
    for n in (5e7, 1.3e9, 7e9, 7e10):
        cfg = config_for_params(n)
        assert cfg.num_params().total == pytest.approx(n, rel=0.1)
        assert 60 <= cfg.dim / cfg.n_layers <= 160


# one line a case: the arguments, and what the one error line must contain (the flag it names)
BAD_ARGUMENTS = [
    (["--params", "-5"], "--params must be positive"),
    (["--params", "-7e9"], "--params must be positive"),
    (["--params", "0"], "--params must be positive"),
    (["--params", "inf"], "--params must be a finite number"),
    (["--params", "nan"], "--params must be a finite number"),
    (["--params", "1e40"], "--params must be at most 1e+15"),
    (["--params", "1e9", "--tokens", "0"], "--tokens must be positive"),
    (["--params", "1e9", "--tokens", "1e60"], "--tokens must be at most"),
    (["--params", "1e9", "--tokens", "0.5"], "--tokens must be at least 1"),
    (["--budget-flops", "inf"], "--budget-flops must be a finite number"),
    (["--budget-flops", "1e80"], "--budget-flops must be at most"),
    (["--budget-flops", "1e33", "--law", "kaplan"], "past the planner's range"),
    (["--budget-flops", "1e9"], "below the smallest model"),
    (["--params", "1e9", "--hardware", "tpu-v9"], "--hardware: unknown hardware 'tpu-v9'"),
    (["--params", "1e9", "--hardware", "h100"], "did you mean 'h100-80gb'"),
    (["--params", "1e9", "--mfu", "1.5"], "--mfu must be in (0, 1]"),
    (["--params", "1e9", "--mfu", "0"], "--mfu must be in (0, 1]"),
    (["--params", "1e9", "--mfu", "nan"], "--mfu must be a finite number"),
    (["--params", "1e9", "--peak-tflops", "0"], "--peak-tflops must be positive"),
    (["--params", "1e9", "--peak-tflops", "inf"], "--peak-tflops must be a finite number"),
    (["--params", "1e9", "--memory-gb", "0"], "--memory-gb must be positive"),
    (["--params", "1e9", "--memory-gb", "-80"], "--memory-gb must be positive"),
    (["--params", "1e9", "--price", "-1"], "--price must be >= 0"),
    (["--params", "1e9", "--price", "inf"], "--price must be a finite number"),
    (["--params", "1e9", "--power", "-700"], "--power must be >= 0"),
    (["--params", "1e9", "--grid", "-0.4"], "--grid must be >= 0"),
    (["--params", "1e9", "--pue", "0.5"], "--pue must be >= 1"),
    (["--params", "1e9", "--devices", "0"], "--devices must be positive"),
    (["--params", "1e9", "--batch", "-1"], "--batch must be positive"),
    (["--params", "1e9", "--seq-len", "0"], "--seq-len must be positive"),
    (["--params", "1e9", "--context", "0"], "--context must be positive"),
    (["--params", "1e9", "--infer-batch", "0"], "--infer-batch must be positive"),
    (["--params", "1e9", "--vocab-size", "0"], "--vocab-size must be positive"),
    (["--params", "1e9", "--lora-rank", "-1"], "--lora-rank must be >= 0"),
    (["--params", "1e9", "--devices", "1" + "0" * 400], "--devices must be at most 1e+09, got 1e+400"),
    (["--params", "1e9", "--batch", str(10**20)], "--batch must be at most 1e+09"),
    (["--params", "1e9", "--seq-len", str(10**20)], "--seq-len must be at most 1e+09"),
    (["--params", "1e9", "--context", str(10**20)], "--context must be at most 1e+09"),
    (["--params", "1e9", "--vocab-size", str(10**20)], "--vocab-size must be at most 1e+09"),
    (["--params", "1e9", "--lora-rank", str(10**20)], "--lora-rank must be at most 1e+09"),
    (["--params", "1e9", "--qlora"], "--qlora needs --lora-rank"),
    (["llama-tiny", "--lora-rank", "100"], "--lora-rank 100 exceeds the model's width 64"),
    (["llama-tiny", "--seq-len", "256"], "--seq-len 256 exceeds the context of preset llama-tiny"),
    (["llama-tiny", "--context", "1000"], "--context 1000 exceeds the context"),
    # flags that contradict each other, or that the others make meaningless
    (["--params", "1e9", "--budget-flops", "1e20"], "--budget-flops sizes the model"),
    (["llama-7b", "--budget-flops", "1e20"], "--budget-flops sizes the model"),
    (["--budget-flops", "1e20", "--tokens", "1e9"], "takes no --tokens"),
    (["llama-7b", "--params", "1e9"], "give a model or --params, not both"),
    (["--params", "1e9", "--law", "kaplan"], "--law splits a --budget-flops"),
    (["llama-7b", "--vocab-size", "1000"], "--vocab-size applies to a model sized from"),
    (["nope-7b"], "neither a preset nor a file"),
    ([], "name a model"),
]


@pytest.mark.parametrize("args, message", BAD_ARGUMENTS)
def test_bad_input_is_one_clear_error_line(capsys, args, message):
    assert main(["plan", *args]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message in captured.err


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "\n", "nested too deeply"),
    ("dim: [\n", "invalid YAML at line 2"),
    ("", "is empty"),
    ("model: 5\n", "expected a model config"),
    ("family: [1]\n", "expected a model config"),
    ("model: {family: llama, dim: 4096, n_layers: 100000000, n_heads: 32}\n", "past the planner's range"),
])
def test_a_bad_model_file_is_named(capsys, tmp_path, text, message):
    path = tmp_path / "model.yaml"
    path.write_text(text)
    assert main(["plan", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and message in err and err.count("\n") == 1


def test_a_folder_or_non_utf8_file_as_the_model_is_named(capsys, tmp_path):
    assert main(["plan", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "m.yaml").write_bytes(b"\xff\xfe")
    assert main(["plan", str(tmp_path / "m.yaml")]) == 1
    assert "not UTF-8" in capsys.readouterr().err
    os.mkfifo(tmp_path / "pipe.yaml")  # reading it would block for ever
    assert main(["plan", str(tmp_path / "pipe.yaml")]) == 1
    assert "pipe.yaml: is a FIFO (named pipe), not a regular file" in capsys.readouterr().err


def test_a_short_model_plans_at_its_own_context(capsys):
    out = plan_json(capsys, "llama-tiny")  # 128 tokens of context: the default 2048 would not run
    assert out["seq_len"] == 128 and out["inference_memory"]["kv_cache_for"]["context"] == 128
    assert plan_json(capsys, "--params", 1e7, "--context", 8192)["model"]["config"]["max_seq_len"] == 8192


def test_estimates_refuse_bad_arguments_from_python():
    shape = est.shape_of(get_preset("llama-tiny"))
    with pytest.raises(est.PlanError, match="tokens must be a finite number"):
        est.training_flops(1e6, float("inf"))
    with pytest.raises(est.PlanError, match="batch must be a whole number"):
        est.kv_cache_bytes(shape, 1.5, 128)
    with pytest.raises(est.PlanError, match="lora_rank must be >= 0"):
        est.training_memory(shape, batch=1, seq_len=16, lora_rank=-2)
    for name, value in (("price_per_hour", -1.0), ("power_watts", float("nan")), ("pue", 0.9),
                        ("grid_kg_per_kwh", -0.1), ("mfu", 2.0)):
        with pytest.raises(est.PlanError, match=name):
            est.run_cost(1e18, 1e12, **{name: value})
    with pytest.raises(est.PlanError, match="params must be a finite number"):
        config_for_params(float("inf"))
    with pytest.raises(est.PlanError, match="vocab_size must be positive"):
        config_for_params(1e9, vocab_size=0)
    with pytest.raises(est.PlanError, match="flop budget must be a finite number"):
        tokens_per_param_optimal(float("nan"))
    with pytest.raises(est.PlanError, match="params must be positive"):
        CHINCHILLA.loss(0, 1e9)
    with pytest.raises(est.PlanError, match="memory_bytes must be positive"):
        get_hardware("h100-80gb", memory_bytes=0)
    with pytest.raises(est.PlanError, match="unknown hardware field 'speed'"):
        get_hardware("h100-80gb", speed=1.0)


def test_unknown_precision_is_named():
    with pytest.raises(est.PlanError, match="unknown precision 'int3'"):
        est.weight_bytes(1e9, "int3")


def test_human_output_and_a_runnable_config(capsys, tmp_path):
    out = tmp_path / "model.yaml"
    assert main(["plan", "--budget-flops", "1e17", "--vocab-size", "4096", "--hardware", "a100-80gb",
                 "--write-config", str(out)]) == 0
    text = capsys.readouterr().out
    for word in ("compute-optimal", "petaflop/s-days", "KV cache", "per device", "device-hours", "CO2"):
        assert word in text
    from llmlab.config import load_config
    from llmlab.train.pretrain import PretrainConfig

    cfg = load_config(PretrainConfig, out)  # the written section is a valid model config for pretrain
    assert cfg.model.num_params().total == pytest.approx(tokens_per_param_optimal(1e17)[0], rel=0.15)
    again = plan_json(capsys, str(out), "--tokens", 1e9)
    assert again["model"]["params"] == cfg.model.num_params().total


def test_hardware_overrides_and_this_cpu(capsys):
    assert get_hardware("h100-80gb", price_per_hour=1.0, power_watts=None).price_per_hour == 1.0
    cpu = get_hardware("this-cpu")
    assert cpu.peak_flops > 1e9 and cpu.bandwidth > 1e9 and cpu.memory_bytes > 1e9
    on_cpu, on_gpu = (plan_json(capsys, "--params", 1e7, "--tokens", 1e9, "--hardware", hw)["training_memory"]
                      for hw in ("this-cpu", "a100-80gb"))
    assert on_gpu["runtime"] == 0 and on_cpu["total"] == pytest.approx(on_gpu["total"] + on_cpu["runtime"])
    assert on_cpu["runtime"] > 0.65 * on_cpu["activations"]


@pytest.mark.parametrize("args, choice", [
    (["--params", "1e8"], "ddp"),  # both fit: the simpler one
    (["--params", "7e9", "--checkpointing"], "fsdp"),  # 119 GB a copy, 22 GB a shard
    (["--params", "7e10"], None),  # 1.6 TB a copy, 631 GB a shard
])
def test_the_plan_for_several_devices_says_which_parallelism_fits(capsys, args, choice):
    assert main(["plan", *args, "--hardware", "a100-80gb", "--gpus", "8", "--json"]) == 0
    par = json.loads(capsys.readouterr().out)["parallel"]
    assert par["choice"] == choice and par["fsdp_bytes"] < par["ddp_bytes"]
    assert par["setting"] == (f"system.parallel={choice}" if choice else None)
    assert main(["plan", *args, "--hardware", "a100-80gb", "--gpus", "8"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("parallel"))
    assert (f"use system.parallel={choice}" in line) if choice else ("neither fits" in line)


def test_encoders_and_encoder_decoders(capsys):
    # an encoder keeps no KV cache; T5's activations and cache count the layers of both stacks
    bert = plan_json(capsys, "bert-base", "--seq-len", 128)
    assert bert["inference_memory"]["kv_cache"] == 0
    t5 = get_preset("t5-base")
    shape = est.shape_of(t5)
    assert shape.n_layers == t5.n_layers + t5.n_decoder_layers == 24
    out = plan_json(capsys, "t5-base", "--seq-len", 128, "--context", 128)
    # self-attention keys and values over the output plus cross-attention ones over the input, per decoder layer
    assert out["inference_memory"]["kv_cache"] == 2 * 2 * 12 * 768 * 128 * 2
    # training FLOPs per token count the encoder's and decoder's matmuls once for an input and target pair
    params = t5.num_params().non_embedding
    assert 6 * params / 2 < out["flops_per_token"] < 6 * (params + t5.vocab_size * t5.dim) / 2 * 1.2


def test_a_sparse_model_is_costed_by_its_active_parameters_and_stored_by_all(capsys):
    out = plan_json(capsys, "mixtral-8x7b", "--tokens", 1e12)
    model = out["model"]
    assert model["params"] == 46_702_792_704 and abs(model["active_params"] / 12.9e9 - 1) < 0.03
    assert 6 * model["active_params"] <= out["flops_per_token"] < 6 * model["active_params"] * 1.2  # not 6 x total
    assert out["inference_memory"]["weights"]["bf16"] == 2 * model["params"]  # every expert is held


def test_a_sparse_model_trains_by_default_as_long_as_a_dense_one_of_its_compute(capsys):
    out = plan_json(capsys, "mixtral-8x7b")
    assert out["tokens"] == 20 * out["model"]["active_params"] and out["tokens_per_active_param"] == 20
    assert main(["plan", "mixtral-8x7b"]) == 0
    assert "(20.0 per active parameter, 5.5 per parameter)" in capsys.readouterr().out
    dense = plan_json(capsys, "mistral-7b")
    assert dense["tokens"] == 20 * dense["model"]["params"] == 20 * dense["model"]["active_params"]
