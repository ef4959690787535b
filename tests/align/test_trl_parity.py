"""Parity with TRL: llmlab's alignment losses against TRL's trainers, on the same token ids.

A tiny random llmlab Llama is exported with `save_hf` and loaded in transformers; TRL's trainer runs on the HF
copy through its own code path (its collator or generation, its patched fused LM head, its loss), llmlab's
functions run on the llmlab model, and the losses, the metrics TRL logs and the gradient of every parameter
(HF names mapped back with `hf_to_llmlab_state`) must agree within 1e-5 in fp32 (gradients relative to their
largest entry where that exceeds 1).

What TRL 1.16 does that the tests rely on:
- DPO "sigmoid" and "ipo": sequence log-probabilities are sums over the completion tokens; IPO divides each
  sequence's summed log-ratio by its completion length, which equals llmlab's loss on averaged log-probabilities.
  TRL's logged rewards are beta times the summed log-ratio for both (llmlab reports beta times the log-ratio it
  was given: averaged for IPO), so rewards are compared for "sigmoid" only.
- RPO: loss_type ["sigmoid", "sft"] with loss_weights [1, w] adds w times the mean negative log-probability of
  the batch's chosen completion tokens.
- "sigmoid" ignores `label_smoothing`; conservative DPO's -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
  lives on in "aot", which sorts the batch's log-ratios and so is exactly that loss on a batch of one pair.
- GRPO: advantages (r - mean) / (std + 1e-4) with the unbiased std per group; the KL estimator k3; the per-token
  ratio against the log-probabilities taken at generation time (`num_iterations` > 1) or against the detached
  current ones; loss types "grpo" (mean per answer, then over answers), "dapo" (the default: over the tokens of
  the generation batch) and "bnpo" (over the tokens of the local batch); `use_bias_correction_kl` (the default)
  multiplies the KL estimate by the ratio; beta=0 (the default) loads no reference and adds no KL.
- Reward model: -log sigma(r_w - r_l - margin) averaged over pairs, the score read at each row's last non-pad token.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from llmlab.align.logprobs import sequence_logprobs, token_logprobs
from llmlab.align.losses import dpo_loss, group_advantages, grpo_loss, reward_loss
from llmlab.models import LlamaConfig, build_model
from llmlab.models.convert import hf_to_llmlab_state, llmlab_to_hf_state
from llmlab.models.io import save_hf

pytestmark = pytest.mark.hf
tf = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

V = 97
PAD, EOS = 0, 1  # token ids "<pad>" and "<eos>"; words t2 ... t96 are ids 2 ... 96
CFG = LlamaConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
TOL = 1e-5


def _model(seed: int) -> nn.Module:
    """A tiny Llama whose logits are far from uniform: matrices ~ N(0, 0.3), norm weights ~ U(0.5, 1.5)."""
    torch.manual_seed(seed)
    model = build_model(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


def _hf(model: nn.Module, folder) -> nn.Module:
    save_hf(model, folder)
    return tf.AutoModelForCausalLM.from_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizer():
    import tokenizers

    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"t{i}": i for i in range(2, V)}}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>")


def _args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False,
               gradient_checkpointing=False, seed=0, **kw)


def _words(n: int, g: torch.Generator) -> str:
    return " ".join(f"t{i}" for i in torch.randint(2, V, (n,), generator=g).tolist())


def _grad_error(hf: nn.Module, ours: nn.Module) -> float:
    """The largest difference between the two models' gradients, over every parameter, relative to the largest
    gradient entry where that is above 1 (fp32 rounding grows with the gradient's size)."""
    grads = hf_to_llmlab_state({k: p.grad for k, p in hf.named_parameters()}, "llama")
    mine = {k: p.grad for k, p in ours.named_parameters()}
    assert grads.keys() == mine.keys()
    assert all(g is not None and g.abs().max() > 0 for g in mine.values())  # every parameter is reached
    scale = max(1.0, max(g.abs().max().item() for g in mine.values()))
    return max((grads[k] - mine[k]).abs().max().item() for k in mine) / scale


def _last(metrics: dict, key: str) -> float:
    return metrics["train"][key][-1]


# --------------------------------------------------------------------------- DPO, IPO, conservative DPO

BETA = 0.5


def _pairs(n: int = 3) -> "datasets.Dataset":
    """Text pairs whose prompts and answers differ in length, so rows pad differently."""
    g = torch.Generator().manual_seed(2)
    shapes = [(3, 4, 2), (5, 2, 6), (2, 3, 3)][:n]
    return datasets.Dataset.from_list([{"prompt": _words(p, g), "chosen": " " + _words(c, g),
                                        "rejected": " " + _words(r, g)} for p, c, r in shapes])


def _targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """llmlab's (input_ids, targets) for TRL's preference batch: the next token where it is a completion token."""
    ids, completion = batch["input_ids"], batch["completion_mask"]
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:].masked_fill(completion[:, 1:] == 0, -100)
    return ids, targets


def _dpo_trainer(tmp_path, tokenizer, policy, ref, batch_size: int, **kw):
    trainer = trl.DPOTrainer(model=_hf(policy, tmp_path / "policy"), ref_model=_hf(ref, tmp_path / "ref"),
                             args=_args(trl.DPOConfig, tmp_path, beta=BETA, per_device_train_batch_size=batch_size,
                                        **kw), train_dataset=_pairs(), processing_class=tokenizer)
    trainer.model.train()
    return trainer


def _ours_dpo(policy, ref, batch: dict, kind: str, label_smoothing: float = 0.0):
    ids, targets = _targets(batch)
    average = kind == "ipo"  # what llmlab's DPO loop passes for IPO
    logps = sequence_logprobs(policy, ids, targets, average=average).view(2, -1)  # rows: chosen, rejected
    with torch.no_grad():
        ref_logps = sequence_logprobs(ref, ids, targets, average=average).view(2, -1)
    return dpo_loss(logps[0], logps[1], ref_logps[0], ref_logps[1], BETA, label_smoothing, kind=kind)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_match_trl_dpo_trainer(loss_type, tmp_path, tokenizer):
    """TRL: DPOTrainer built on an in-memory text dataset (its tokenization, EOS and collator), one batch from
    its train dataloader, `trainer.compute_loss` (its fused-LM-head forward of policy and reference model)."""
    policy, ref = _model(0), _model(1)
    trainer = _dpo_trainer(tmp_path, tokenizer, policy, ref, 3, loss_type=[loss_type])
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()

    out = _ours_dpo(policy, ref, batch, "dpo" if loss_type == "sigmoid" else "ipo")
    out.loss.mean().backward()
    assert abs(trl_loss.item() - out.loss.mean().item()) < TOL
    assert _grad_error(trainer.model, policy) < TOL
    if loss_type == "sigmoid":
        metrics = trainer._metrics
        assert abs(_last(metrics, "rewards/chosen") - out.chosen_rewards.mean().item()) < TOL
        assert abs(_last(metrics, "rewards/rejected") - out.rejected_rewards.mean().item()) < TOL
        assert _last(metrics, "rewards/accuracies") == (out.chosen_rewards > out.rejected_rewards).float().mean()


def test_conservative_dpo_matches_trl_aot_on_single_pairs(tmp_path, tokenizer):
    """TRL: DPOTrainer with loss_type "aot" and batches of one pair (where its sort is the identity and the loss is
    conservative DPO's), `trainer.compute_loss` on each batch of its dataloader, gradients accumulated as 1/n."""
    eps = 0.2
    policy, ref = _model(0), _model(1)
    trainer = _dpo_trainer(tmp_path, tokenizer, policy, ref, 1, loss_type=["aot"], label_smoothing=eps)
    batches = [trainer._prepare_inputs(b) for b in trainer.get_train_dataloader()]
    assert len(batches) == 3
    trl_total = ours_total = 0.0
    for batch in batches:
        trl_loss = trainer.compute_loss(trainer.model, batch) / len(batches)
        trl_loss.backward()
        ours = _ours_dpo(policy, ref, batch, "dpo", label_smoothing=eps).loss.mean() / len(batches)
        ours.backward()
        trl_total, ours_total = trl_total + trl_loss.item(), ours_total + ours.item()
    plain = sum(_ours_dpo(policy, ref, b, "dpo").loss.mean().item() for b in batches) / len(batches)
    assert abs(ours_total - plain) > 1e-2  # the smoothing changes the loss
    assert abs(trl_total - ours_total) < TOL
    assert _grad_error(trainer.model, policy) < TOL


def test_rpo_matches_trl_sigmoid_plus_sft(tmp_path, tokenizer):
    """TRL: DPOTrainer with loss_type ["sigmoid", "sft"] and loss_weights [1, w] (RPO); llmlab: the DPO loop's
    `pair_losses` with dpo.sft_weight=w and the reference log-probabilities precomputed."""
    from types import SimpleNamespace

    from llmlab.align.config import DPOConfig
    from llmlab.align.dpo import pair_losses

    w = 0.7
    policy, ref = _model(0), _model(1)
    trainer = _dpo_trainer(tmp_path, tokenizer, policy, ref, 3, loss_type=["sigmoid", "sft"], loss_weights=[1.0, w])
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()

    ids, targets = _targets(batch)
    with torch.no_grad():
        ref_logps = sequence_logprobs(ref, ids, targets).view(2, -1).t()
    ctx = SimpleNamespace(cfg=SimpleNamespace(method="dpo", dpo=DPOConfig(beta=BETA, sft_weight=w)))
    out = pair_losses(ctx, policy, {"input_ids": ids, "targets": targets}, ref_logps)
    out.loss.mean().backward()
    plain = _ours_dpo(_model(0), ref, batch, "dpo").loss.mean().item()
    assert out.loss.mean().item() - plain > 0.1  # the chosen answers' likelihood term is there
    assert abs(trl_loss.item() - out.loss.mean().item()) < TOL
    assert _grad_error(trainer.model, policy) < TOL


# --------------------------------------------------------------------------- reward model


@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_loss_matches_trl_reward_trainer(with_margin, tmp_path, tokenizer):
    """TRL: RewardTrainer on an HF LlamaForSequenceClassification (num_labels=1) holding the tiny model's body and
    a random score head, a pre-tokenized dataset, one batch from its dataloader, `trainer.compute_loss`.
    llmlab: the same model with its lm_head swapped for the score head, read at each row's last real token."""
    policy = _model(0)
    score = torch.randn(1, CFG.dim, generator=torch.Generator().manual_seed(3)) * 0.3
    save_hf(policy, tmp_path / "body")
    hf = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "body", num_labels=1)
    with torch.no_grad():
        hf.score.weight.copy_(score)
    g = torch.Generator().manual_seed(4)
    rows = [{"chosen_ids": torch.randint(2, V, (c,), generator=g).tolist(),
             "rejected_ids": torch.randint(2, V, (r,), generator=g).tolist(),
             **({"margin": m} if with_margin else {})} for c, r, m in [(5, 3, 0.5), (2, 7, 0.0), (4, 4, -1.0)]]
    trainer = trl.RewardTrainer(model=hf, args=_args(trl.RewardConfig, tmp_path, per_device_train_batch_size=3),
                                train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert ("margin" in batch) == with_margin
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()

    ours = copy.deepcopy(policy)
    ours.lm_head = nn.Linear(CFG.dim, 1, bias=False)
    with torch.no_grad():
        ours.lm_head.weight.copy_(score)
    lengths = batch["attention_mask"].sum(1)
    scores = ours(batch["input_ids"])[torch.arange(len(lengths)), lengths - 1, 0]  # (2B,) chosen rows, then rejected
    chosen, rejected = scores.chunk(2)
    loss = reward_loss(chosen, rejected, batch["margin"] if with_margin else 0.0).mean()
    loss.backward()
    assert abs(trl_loss.item() - loss.item()) < TOL
    assert _grad_error(trainer.model, ours) < TOL
    assert abs(_last(trainer._metrics, "margin") - (chosen - rejected).mean().item()) < TOL
    assert abs(_last(trainer._metrics, "mean_reward") - scores.mean().item()) < TOL


# --------------------------------------------------------------------------- GRPO

G = 4  # answers per prompt
PROMPTS = ["t5 t9 t30", "t44 t2 t71"]  # equal lengths: TRL left-pads prompts, llmlab's rollouts do not
CLIP = 0.2


def _reward(completions, completion_ids, **kwargs) -> list[float]:
    """A deterministic reward of the answer's tokens, with ties and spread inside each group."""
    return [float(sum(ids) % 5) for ids in completion_ids]


def _likely_eos(model: nn.Module) -> None:
    """Point the EOS row of lm_head along the mean final hidden state, so answers end at different lengths."""
    hidden = {}
    handle = model.norm.register_forward_hook(lambda module, args, out: hidden.setdefault("h", out))
    with torch.no_grad():
        model(torch.randint(2, V, (16, 10), generator=torch.Generator().manual_seed(5)))
        mean = hidden["h"].flatten(0, 1).mean(0)
        model.lm_head.weight[EOS] = 3.0 * mean / mean.norm() ** 2
    handle.remove()


GRPO_CASES = {
    # TRL's defaults: loss "dapo", beta 0, group scaling, one pass (ratio 1 against the detached log-probs)
    "dapo-default": dict(trl=dict(loss_type="dapo"), normalize="token"),
    # the paper's normalisation and KL, a second pass after an update: the ratio is clipped
    "grpo-kl-second-pass": dict(trl=dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False, num_iterations=2),
                                normalize="sequence"),
    # TRL's KL default (ratio-weighted) at a sampling temperature, unscaled (Dr. GRPO) advantages
    "dapo-weighted-kl-temperature": dict(trl=dict(loss_type="dapo", beta=0.04, num_iterations=2, temperature=0.7,
                                                  scale_rewards="none"), normalize="token"),
    "bnpo": dict(trl=dict(loss_type="bnpo", beta=0.04, use_bias_correction_kl=False), normalize="token"),
}


@pytest.mark.parametrize("case", sorted(GRPO_CASES))
def test_grpo_matches_trl_grpo_trainer(case, tmp_path, tokenizer):
    """TRL: GRPOTrainer's own rollout step `_generate_and_score_completions` (generation, rewards, group
    advantages, the log-probabilities at generation time and the reference's) on a batch of G answers to each of
    two prompts, then `trainer.compute_loss` (`_compute_loss`, with `_get_per_token_logps_and_entropies`). For a
    second pass, the same random update is applied to both models between the two; the KL cases load a
    different reference into TRL's reference model. llmlab: `token_logprobs` of the same answers,
    `group_advantages` of the rewards, `grpo_loss`."""
    spec = GRPO_CASES[case]
    kw = {"beta": 0.0, "use_bias_correction_kl": True, "num_iterations": 1, "temperature": 1.0,
          "scale_rewards": "group", **spec["trl"]}
    second_pass = kw["num_iterations"] > 1
    policy, ref = _model(0), _model(1)
    _likely_eos(policy)
    args = _args(trl.GRPOConfig, tmp_path, per_device_train_batch_size=G * len(PROMPTS), num_generations=G,
                 max_completion_length=6, **kw)
    trainer = trl.GRPOTrainer(model=_hf(policy, tmp_path / "policy"), reward_funcs=_reward, args=args,
                              train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                              processing_class=tokenizer)
    if kw["beta"]:
        trainer.ref_model.load_state_dict(llmlab_to_hf_state(ref.state_dict(), "llama"))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets without gradient accumulation
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])
    mask = inputs["completion_mask"].float()
    assert mask.sum(1).unique().numel() > 1  # answers of different lengths: "sequence" and "token" differ

    prompt_width = inputs["prompt_ids"].shape[1]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    targets = torch.full_like(ids, -100)
    targets[:, prompt_width - 1:-1] = inputs["completion_ids"].masked_fill(mask == 0, -100)

    def logprobs(model):  # (B, C) of the answer tokens
        return token_logprobs(model(ids), targets, temperature=kw["temperature"])[:, prompt_width - 1:-1]

    with torch.no_grad():
        old = logprobs(policy) if second_pass else None
        ref_logprobs = logprobs(ref) if kw["beta"] else None
    if second_pass:
        assert (inputs["old_per_token_logps"] - old).mul(mask).abs().max() < TOL
        noise = torch.Generator().manual_seed(6)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=noise) * 0.05)
        trainer.model.load_state_dict(llmlab_to_hf_state(policy.state_dict(), "llama"))
    rewards = torch.tensor(_reward(None, [c[m.bool()].tolist() for c, m in zip(inputs["completion_ids"], mask)]))
    advantages = group_advantages(rewards, G, scale=kw["scale_rewards"] == "group")
    assert (advantages - inputs["advantages"]).abs().max() < 1e-6

    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    current = logprobs(policy)
    out = grpo_loss(current, current.detach() if old is None else old, ref_logprobs, advantages, mask, CLIP,
                    kw["beta"], spec["normalize"], ratio_weighted_kl=kw["use_bias_correction_kl"])
    out.loss.backward()
    assert abs(trl_loss.item() - out.loss.item()) < TOL
    assert _grad_error(trainer.model, policy) < TOL
    metrics = trainer._metrics
    assert abs(_last(metrics, "clip_ratio/region_mean") - out.clip_fraction.item()) < TOL
    if second_pass:
        assert _last(metrics, "clip_ratio/low_mean") > 0 and _last(metrics, "clip_ratio/high_mean") > 0
    if kw["beta"]:
        assert abs(_last(metrics, "kl") - out.kl.item()) < TOL
    else:
        assert "kl" not in metrics["train"] and trainer.ref_model is None
