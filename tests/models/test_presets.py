"""Presets: published sizes reproduce their published parameter counts; tiny ones build."""

from __future__ import annotations

import pytest
import torch

from llmlab.models import build_model
from llmlab.models.presets import PRESETS, get_preset

PUBLISHED = {name: p for name, p in PRESETS.items() if p.published_params is not None}
TINY = {name: p for name, p in PRESETS.items() if p.published_params is None}


def test_every_published_preset_is_within_3_percent():
    off = {}
    for name, preset in PUBLISHED.items():
        assert preset.source, f"{name} has no source for its published figure"
        n = get_preset(name).num_params()
        if preset.digits is not None:  # published to fewer digits than 3% needs: it rounds to the figure
            if float(f"{n.total:.{preset.digits}g}") != preset.published_params:
                off[name] = (n.total, preset.published_params)
        elif abs(n.total / preset.published_params - 1) > 0.03:
            off[name] = (n.total, preset.published_params)
        if preset.published_active is not None and abs(n.active / preset.published_active - 1) > 0.03:
            off[name + " active"] = (n.active, preset.published_active)
    assert not off, off
    # GPT-1, GPT-2 x4, GPT-3 x7, Gopher, Chinchilla, BLOOM, LLaMA x4, 2 x3, ...; BERT x2, RoBERTa x2,
    # ALBERT x4, T5 x5, mT5 x5
    assert len(PUBLISHED) == 27 + 18 + 3  # + Mixtral, GLaM, Switch-Base
    sparse = {name for name, p in PUBLISHED.items() if p.published_active is not None}
    assert sparse == {"mixtral-8x7b", "glam-64b-64e", "switch-base-128"}
    named = {"gpt1", "gpt2-124m", "gpt2-355m", "gpt2-774m", "gpt2-1.5b", "gpt3-175b", "llama-7b", "llama-13b",
             "llama-33b", "llama-65b", "llama-2-7b", "llama-2-13b", "llama-2-70b", "chinchilla-70b",
             "gopher-280b", "palm-540b", "bloom-176b", "bert-base", "bert-large", "roberta-base", "roberta-large",
             "albert-base", "albert-xxlarge", "t5-small", "t5-11b", "mt5-small", "mt5-xxl"}
    assert named <= PUBLISHED.keys()


def test_well_known_counts_exactly():
    assert get_preset("gpt2-124m").num_params().total == 124_439_808  # the released GPT-2 small
    assert get_preset("llama-7b").num_params().total == 6_738_415_616  # the released LLaMA 7B
    assert get_preset("llama-2-70b").num_params().total == 68_976_648_192
    assert get_preset("t5-small").num_params().total == 60_506_624  # the released t5-small
    assert get_preset("t5-large").num_params().total == 737_668_096
    mixtral = get_preset("mixtral-8x7b").num_params()  # the released 46,702,792,704, of which 12.9B active
    assert mixtral.total == 46_702_792_704 and abs(mixtral.active / 12.9e9 - 1) < 0.03
    glam = get_preset("glam-64b-64e").num_params()
    assert round(glam.total / 1e9) == 1162 and round(glam.active / 1e8) == 966  # 1.162T; 96.6B active
    switch, t5_base = get_preset("switch-base-128").num_params(), get_preset("t5-base").num_params()
    assert switch.active == t5_base.total + 12 * 768 * 128  # T5-Base and the routers: equal compute per token


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_presets_build_and_count(name):
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        model = build_model(get_preset(name))
    assert model.num_params().total == sum(p.numel() for p in model.parameters())


def test_overrides_and_unknown_names():
    assert get_preset("llama-tiny", vocab_size=300).vocab_size == 300
    with pytest.raises(KeyError, match="did you mean llama-7b"):
        get_preset("llama-7")
