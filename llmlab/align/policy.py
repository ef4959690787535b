"""The model an alignment run trains, its reference, and how both are saved.

`AlignModel` holds the policy (or the reward model) and, for PPO, a value head that reads the
policy's last hidden state. With LoRA the reference model is the same weights with the adapters
disabled; with full fine-tuning it is a frozen copy, or log-probabilities computed once.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from llmlab.common import LlmlabError, atomic_dir
from llmlab.models import build_model
from llmlab.models.io import (CheckpointError, copy_tokenizer_files, load_model, load_state_into, read_config,
                              read_state_dict, save_model, save_safetensors)
from llmlab.peft import LoraConfig, apply_lora, disable_adapters, merge_and_unload, save_adapter
from llmlab.peft.io import load_adapter_weights

HEADS = "heads.safetensors"  # trained tensors outside the adapters (a score head, a value head)


class AlignModel(nn.Module):
    """The trained policy, and with `value_head` a linear value function on its final normed hidden
    state (a shared trunk, as in Ziegler et al. 2019). `forward(input_ids)` returns the logits, or
    (logits, values) with a value head."""

    def __init__(self, model: nn.Module, *, value_head: bool = False):
        super().__init__()
        self.model = model
        self.config = model.config
        self.value_head = nn.Linear(model.config.dim, 1) if value_head else None
        self._hidden: torch.Tensor | None = None
        if value_head:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            model.norm.register_forward_hook(self._keep_hidden)

    def _keep_hidden(self, module, inputs, output) -> None:
        self._hidden = output

    def forward(self, input_ids: torch.Tensor):
        logits = self.model(input_ids)
        if self.value_head is None:
            return logits
        hidden, self._hidden = self._hidden, None
        return logits, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)


def load_policy(base: str, device: torch.device, *, lora: LoraConfig | None, reward_head: bool = False,
                value_head: bool = False) -> AlignModel:
    """The base as the run trains it: with `reward_head` its language-model head is replaced by a
    fresh scalar score head (a reward model, `num_labels=1`); with `lora` adapters are applied (the
    score head then trains whole beside them)."""
    model = load_model(base, device)
    if reward_head:
        model = reward_model_from(model)
    for p in model.parameters():
        p.requires_grad_(True)
    if lora is not None:
        apply_lora(model, lora)
        if reward_head:
            model.lm_head.weight.requires_grad_(True)
    return AlignModel(model, value_head=value_head).to(device)


def reward_model_from(model: nn.Module) -> nn.Module:
    """A reward model built on `model`: its weights, and a zero-initialised scalar head on the final
    normed hidden state in place of the language-model head (untied from the embedding)."""
    cfg = copy.deepcopy(model.config)
    cfg.num_labels, cfg.tie_embeddings = 1, False
    device = next(model.parameters()).device
    with torch.device(device):
        rm = build_model(cfg)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["lm_head.weight"] = torch.zeros(1, cfg.dim, device=device)
    rm.load_state_dict(state, strict=True)
    return rm


def reward_scores(model: nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The score of each right-padded row (B,): the scalar head's output at the row's last real token
    (`lengths` real tokens), as HF's *ForSequenceClassification reads it."""
    out = model(input_ids)
    out = out[0] if isinstance(out, tuple) else out
    return out[torch.arange(len(lengths), device=out.device), lengths - 1, 0].float()


def load_reward_model(path: str, device: torch.device, tokenizer) -> nn.Module:
    """A trained reward model (`method=rm`'s final/ or any checkpoint with num_labels=1), checked to
    share the policy's tokenizer."""
    try:
        cfg, _ = read_config(path)
    except LlmlabError as e:
        raise LlmlabError(f"reward.model: {e}") from None
    if getattr(cfg, "num_labels", 0) != 1:
        head = f"{cfg.num_labels}-label" if getattr(cfg, "num_labels", 0) else "language-model"
        raise LlmlabError(f"reward.model={path}: not a reward model (it has a {head} head; train one with "
                          "method=rm)")
    from llmlab.tokenizer import load_tokenizer

    if vocab_digest(load_tokenizer(path)) != vocab_digest(tokenizer):
        raise LlmlabError(f"reward.model={path}: its tokenizer differs from the policy's; a reward model scores "
                          "the policy's token ids, so it must be trained from a model with the same tokenizer")
    model = load_model(path, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def vocab_digest(tokenizer) -> str:
    """SHA-256 of a tokenizer's vocabulary (token -> id), what two tokenizers must share to read the
    same ids the same way."""
    vocab = sorted(tokenizer.backend.get_vocab(with_added_tokens=True).items())
    return hashlib.sha256(repr(vocab).encode()).hexdigest()


@contextlib.contextmanager
def reference(policy: AlignModel, frozen: nn.Module | None) -> Iterator[nn.Module]:
    """The reference model for the block: a frozen copy when given, else the policy's base with its
    adapters disabled (no second copy of the weights)."""
    if frozen is not None:
        yield frozen
        return
    with disable_adapters(policy.model), torch.no_grad():
        yield policy.model


def frozen_copy(policy: AlignModel) -> nn.Module:
    """A frozen copy of the starting policy: the reference of a full fine-tuning run."""
    ref = copy.deepcopy(policy.model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


# --------------------------------------------------------------------------- checkpoints and export


def _heads(policy: AlignModel, lora: bool) -> dict[str, torch.Tensor]:
    """Trained tensors a checkpoint holds beside the adapter or the model: a value head, and with LoRA
    a reward model's score head."""
    heads = {f"value_head.{k}": v for k, v in policy.value_head.state_dict().items()} \
        if policy.value_head is not None else {}
    if lora and policy.config.num_labels:
        heads["model.lm_head.weight"] = policy.model.lm_head.weight
    return {k: v.detach().cpu().contiguous() for k, v in heads.items()}


def saver(lora: LoraConfig | None, base: str):
    """`save_checkpoint`'s save_weights for an AlignModel: the adapter (PEFT format) or the whole
    model, and the heads."""

    def save(policy: AlignModel, folder: Path) -> None:
        if lora is not None:
            save_adapter(policy.model, folder, lora, base=base)
        else:
            save_model(policy.model, folder)
        heads = _heads(policy, lora is not None)
        if heads:
            save_safetensors(heads, folder / HEADS)

    return save


def loader(lora: bool):
    """`load_checkpoint`'s load_weights for what `saver` wrote."""

    def load(policy: AlignModel, folder: Path) -> None:
        if lora:
            load_adapter_weights(policy.model, folder)
        else:
            load_state_into(policy.model, read_state_dict(folder), str(folder))
        expected = _heads(policy, lora)
        if not expected:
            return
        try:
            heads = load_file(folder / HEADS)
        except Exception as e:  # missing or damaged: safetensors raises its own error types
            raise CheckpointError(f"{folder / HEADS}: cannot be read ({e})") from None
        if set(heads) != set(expected):
            raise CheckpointError(f"{folder / HEADS}: holds {sorted(heads)}, this run trains {sorted(expected)}")
        with torch.no_grad():
            for name, tensor in heads.items():
                policy.get_parameter(name).copy_(tensor)

    return load


def export(policy: AlignModel, out: Path, base: str, lora: LoraConfig | None, template) -> tuple[str, str | None]:
    """`final/`: the merged model (a reward model keeps its score head) with the base's tokenizer files
    and the chat template it was aligned with; `adapter/` for LoRA runs (PEFT format)."""
    model = policy.model
    adapter = None
    if lora is not None:
        with atomic_dir(out / "adapter", merge=True) as tmp:
            save_adapter(model, tmp, lora, base=str(Path(base).resolve()))
        adapter = str(out / "adapter")
        model = merge_and_unload(copy.deepcopy(model))
    model.eval()
    with atomic_dir(out / "final", merge=True) as tmp:
        save_model(model, tmp)
        copy_tokenizer_files(base, tmp)
        (tmp / "chat_template.jinja").write_text(template.source, encoding="utf-8")
    return str(out / "final"), adapter
