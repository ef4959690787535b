"""Named model sizes as plain data: tiny presets that train on a laptop CPU, and the published zoo.

Each published entry carries the parameter count its paper (or model card) reports and where
that figure comes from; `tests/models/test_presets.py` checks that the count computed from the
config lands within 3% of it, or, for a figure the paper gives to fewer digits than that needs
(GLaM's "1.2T", Switch-Base's "7B"), that it rounds to the figure as published. A sparse model also
carries its published active count (the parameters one token uses), checked within 3%. Published
models are built in the family whose block they share (see the family files for the few
deviations, e.g. GPT-3's sparse layers).
"""

from __future__ import annotations

from typing import NamedTuple

from llmlab.config import from_dict
from llmlab.models import REGISTRY, ModelConfig


class Preset(NamedTuple):
    family: str
    fields: dict  # overrides of the family config's defaults
    published_params: float | None = None  # total parameters as published
    source: str = ""  # where the published figure and shapes come from
    published_active: float | None = None  # of a sparse model: the parameters a token uses, as published
    digits: int | None = None  # the significant digits the total is published to, when too few for 3%


def _gpt(published: float, source: str, vocab_size: int = 50257, max_seq_len: int = 2048, **fields) -> Preset:
    return Preset("gpt", dict(vocab_size=vocab_size, max_seq_len=max_seq_len, **fields), published, source)


def _llama(published: float, source: str, active: float | None = None, digits: int | None = None,
           **fields) -> Preset:
    return Preset("llama", {"vocab_size": 32000, **fields}, published, source, active, digits)


def _bert(published: float, source: str, **fields) -> Preset:
    return Preset("bert", {"vocab_size": 30522, "sentence_head": True, **fields}, published, source)


def _roberta(published: float, dim: int, n_layers: int, n_heads: int) -> Preset:
    return Preset("bert", dict(variant="roberta", vocab_size=50265, pad_id=1, type_vocab_size=1, dim=dim,
                               n_layers=n_layers, n_heads=n_heads), published, _ROBERTA)


def _albert(published: float, dim: int, n_layers: int, n_heads: int, source: str = "") -> Preset:
    return Preset("bert", dict(variant="albert", vocab_size=30000, embed_dim=128, share_layers=True,
                               activation="gelu_tanh", sentence_head=True, dropout=0.0, dim=dim, n_layers=n_layers,
                               n_heads=n_heads), published, source or _ALBERT)


def _t5(published: float, source: str, **fields) -> Preset:
    return Preset("t5", {"vocab_size": 32128, **fields}, published, source)


def _mt5(published: float, **fields) -> Preset:
    return Preset("t5", {"vocab_size": 250112, "mlp": "gated-gelu", "tie_embeddings": False, "dropout": 0.0,
                         **fields}, published, _MT5)


_BERT = "Devlin et al. 2019, BERT, Sec. 3 (counts with the pooler and the NSP head)"
_ROBERTA = "Liu et al. 2019, RoBERTa, fairseq's released models (BERT's shapes, 50k byte-level BPE)"
_ALBERT = "Lan et al. 2020, ALBERT, Table 1 (E = 128, all layers shared)"
_T5 = "Raffel et al. 2020, T5, Sec. 3.7 and the released configs"
_MT5 = "Xue et al. 2021, mT5, Table 2 and the released configs (T5 v1.1 blocks, 250k vocabulary)"
_GPT3 = "Brown et al. 2020, GPT-3, Table 2.1"
_LLAMA1 = "Touvron et al. 2023, LLaMA, Table 2"
_LLAMA2 = "Touvron et al. 2023, Llama 2, Table 1 and the released config.json"
_PALM = "Chowdhery et al. 2022, PaLM, Table 1 (d_ff = 4 d_model, head size 256, multi-query)"

PRESETS: dict[str, Preset] = {
    # ---- tiny sizes for CPUs (no published counterpart)
    "gpt-tiny": Preset("gpt", dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, max_seq_len=128)),
    "llama-tiny": Preset("llama", dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                       max_seq_len=128)),
    "llama-1m": Preset("llama", dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, hidden_dim=384,
                                     max_seq_len=512, tie_embeddings=True)),
    "llama-14m": Preset("llama", dict(vocab_size=8192, dim=384, n_layers=6, n_heads=6, max_seq_len=512,
                                      tie_embeddings=True)),
    "llama-185m": Preset("llama", dict(vocab_size=32000, dim=1024, n_layers=12, n_heads=16, max_seq_len=2048,
                                       tie_embeddings=True)),
    # ---- GPT-1, GPT-2, GPT-3
    "gpt1": _gpt(117e6, "Radford et al. 2018, GPT-1, Sec. 4.1 (40,478 BPE merges + 512 positions)",
                 vocab_size=40478, max_seq_len=512, dim=768, n_layers=12, n_heads=12),
    "gpt2-124m": _gpt(124e6, "Radford et al. 2019, GPT-2, Table 2 (corrected count of the released model)",
                      max_seq_len=1024, dim=768, n_layers=12, n_heads=12),
    "gpt2-355m": _gpt(355e6, "Radford et al. 2019, GPT-2, Table 2 (released model)",
                      max_seq_len=1024, dim=1024, n_layers=24, n_heads=16),
    "gpt2-774m": _gpt(774e6, "Radford et al. 2019, GPT-2, Table 2 (released model)",
                      max_seq_len=1024, dim=1280, n_layers=36, n_heads=20),
    "gpt2-1.5b": _gpt(1.558e9, "Radford et al. 2019, GPT-2, Table 2 (released model)",
                      max_seq_len=1024, dim=1600, n_layers=48, n_heads=25),
    "gpt3-125m": _gpt(125e6, _GPT3, dim=768, n_layers=12, n_heads=12),
    "gpt3-350m": _gpt(350e6, _GPT3, dim=1024, n_layers=24, n_heads=16),
    "gpt3-760m": _gpt(760e6, _GPT3, dim=1536, n_layers=24, n_heads=16),
    # Table 2.1 lists 24 heads of 128 for XL, which would not tile d_model=2048 (nor give 1.3B);
    # 16 heads of 128 matches both the width and the published count.
    "gpt3-1.3b": _gpt(1.3e9, _GPT3, dim=2048, n_layers=24, n_heads=16),
    "gpt3-2.7b": _gpt(2.7e9, _GPT3, dim=2560, n_layers=32, n_heads=32),
    "gpt3-6.7b": _gpt(6.7e9, _GPT3, dim=4096, n_layers=32, n_heads=32),
    "gpt3-175b": _gpt(175e9, _GPT3, dim=12288, n_layers=96, n_heads=96),
    # ---- Gopher and Chinchilla: Transformer-XL relative positions, RMSNorm, 32k SentencePiece
    "gopher-280b": _gpt(280e9, "Rae et al. 2021, Gopher, Table 1", vocab_size=32000, dim=16384, n_layers=80,
                        n_heads=128, position="relative", norm="rmsnorm", bias=False),
    "chinchilla-70b": _gpt(70e9, "Hoffmann et al. 2022, Chinchilla, Table 4", vocab_size=32000, dim=8192,
                           n_layers=80, n_heads=64, position="relative", norm="rmsnorm", bias=False),
    # ---- BLOOM: ALiBi, a LayerNorm on the embeddings, 250k vocabulary
    "bloom-176b": _gpt(176e9, "BigScience 2022, BLOOM, Table 3", vocab_size=250880, dim=14336, n_layers=70,
                       n_heads=112, position="alibi", embed_norm=True),
    # ---- LLaMA 1 and 2
    "llama-7b": _llama(6.7e9, _LLAMA1, dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, norm_eps=1e-6),
    "llama-13b": _llama(13.0e9, _LLAMA1, dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, norm_eps=1e-6),
    "llama-33b": _llama(32.5e9, _LLAMA1, dim=6656, n_layers=60, n_heads=52, hidden_dim=17920, norm_eps=1e-6),
    "llama-65b": _llama(65.2e9, _LLAMA1, dim=8192, n_layers=80, n_heads=64, hidden_dim=22016, norm_eps=1e-6),
    # Llama 2 7B keeps LLaMA 7B's shapes (6.7B in LLaMA Table 2); Llama 2 Table 1 rounds it to "7B"
    "llama-2-7b": _llama(6.7e9, _LLAMA2, dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, max_seq_len=4096),
    "llama-2-13b": _llama(13e9, _LLAMA2, dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, max_seq_len=4096),
    "llama-2-70b": _llama(70e9, _LLAMA2, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672,
                          max_seq_len=4096),
    # ---- later LLaMA-architecture models
    "llama-3-8b": _llama(8.03e9, "Meta 2024, Llama 3 model card and released config.json", vocab_size=128256,
                         dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, max_seq_len=8192,
                         rope_theta=500000.0),
    "mistral-7b": _llama(7.24e9, "Jiang et al. 2023, Mistral 7B, Table 1 and the released config.json",
                         dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, max_seq_len=32768,
                         sliding_window=4096),
    # ---- sparse: 8 SwiGLU experts in every block, 2 per token (12.9B of the 46.7B active)
    "mixtral-8x7b": _llama(46.7e9, "Jiang et al. 2024, Mixtral of Experts, Sec. 2 and the released config.json",
                           active=12.9e9, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                           max_seq_len=32768, rope_theta=1e6, moe={"n_experts": 8, "top_k": 2}),
    # GLaM's largest: 64 experts in every other block, 2 per token. Table 4's shapes give 1.162T parameters (the
    # "1.2T" of the paper to two digits) and 96.6B active (as published) with plain experts and gated dense
    # MLPs; 128 heads of 128 on a width of 8192. GLaM's GEGLU and relative position biases become SwiGLU and
    # rotary here (the counts do not change but for the few biases).
    "glam-64b-64e": _llama(1.2e12, "Du et al. 2022, GLaM, Table 4 (64B/64E) and Sec. 1 (96.6B activated)",
                           active=96.6e9, digits=2, vocab_size=256000, dim=8192, n_layers=64, n_heads=128,
                           head_dim=128, hidden_dim=32768, max_seq_len=1024, tie_embeddings=True,
                           moe={"n_experts": 64, "top_k": 2, "every": 2, "gated": False, "activation": "gelu"}),
    # ---- PaLM: multi-query attention, parallel blocks, shared embeddings, 256k vocabulary
    "palm-8b": _llama(8.63e9, _PALM, vocab_size=256000, dim=4096, n_layers=32, n_heads=16, n_kv_heads=1,
                      head_dim=256, hidden_dim=16384, tie_embeddings=True, parallel_block=True),
    "palm-62b": _llama(62.5e9, _PALM, vocab_size=256000, dim=8192, n_layers=64, n_heads=32, n_kv_heads=1,
                       head_dim=256, hidden_dim=32768, tie_embeddings=True, parallel_block=True),
    "palm-540b": _llama(540.35e9, _PALM, vocab_size=256000, dim=18432, n_layers=118, n_heads=48, n_kv_heads=1,
                        head_dim=256, hidden_dim=73728, tie_embeddings=True, parallel_block=True),
    # ---- encoders: BERT, RoBERTa, ALBERT (masked-LM heads; BERT and ALBERT with their sentence-pair head)
    "bert-tiny": Preset("bert", dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, max_seq_len=128)),
    "bert-base": _bert(110e6, _BERT, dim=768, n_layers=12, n_heads=12),
    "bert-large": _bert(340e6, _BERT, dim=1024, n_layers=24, n_heads=16),
    "roberta-base": _roberta(125e6, 768, 12, 12),
    "roberta-large": _roberta(355e6, 1024, 24, 16),
    "albert-tiny": Preset("bert", dict(variant="albert", vocab_size=512, embed_dim=32, share_layers=True, dim=64,
                                       n_layers=4, n_heads=4, max_seq_len=128, activation="gelu_tanh")),
    "albert-base": _albert(12e6, 768, 12, 12),
    "albert-large": _albert(18e6, 1024, 24, 16),
    "albert-xlarge": _albert(60e6, 2048, 24, 16),
    # Table 1 lists 235M for xxlarge; the released model (these shapes) has 223M
    "albert-xxlarge": _albert(223e6, 4096, 12, 64, source="Lan et al. 2020, ALBERT, the released xxlarge model"),
    # ---- encoder-decoders: T5 (v1.0: ReLU, tied head) and mT5 (v1.1 blocks, untied)
    "t5-tiny": Preset("t5", dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, head_dim=16, hidden_dim=256,
                                 max_seq_len=128, max_target_len=64)),
    "t5-small": _t5(60e6, _T5, dim=512, n_layers=6, n_heads=8, head_dim=64, hidden_dim=2048),
    "t5-base": _t5(220e6, _T5, dim=768, n_layers=12, n_heads=12, head_dim=64, hidden_dim=3072),
    # the paper names T5-Large "770M"; the released checkpoint of these shapes has 738M
    "t5-large": _t5(738e6, "Raffel et al. 2020, T5, released t5-large checkpoint (named 770M in Sec. 3.7)",
                    dim=1024, n_layers=24, n_heads=16, head_dim=64, hidden_dim=4096),
    "t5-3b": _t5(2.8e9, _T5, dim=1024, n_layers=24, n_heads=32, head_dim=128, hidden_dim=16384),
    "t5-11b": _t5(11e9, _T5, dim=1024, n_layers=24, n_heads=128, head_dim=128, hidden_dim=65536),
    # Switch-Base: T5-Base with 128 ReLU experts in every other block of each stack, one per token, so that a
    # token costs what it costs T5-Base (whose 220M its active count matches); Table 9 gives the total as "7B"
    "switch-base-128": Preset("t5", dict(vocab_size=32128, dim=768, n_layers=12, n_heads=12, head_dim=64,
                                         hidden_dim=3072, moe={"n_experts": 128, "top_k": 1, "every": 2,
                                                               "gated": False, "activation": "relu",
                                                               "normalize": "all", "capacity_factor": 1.25,
                                                               "jitter": 0.01}),
                              7e9, "Fedus et al. 2022, Switch Transformers, Table 9 and the released switch-base-128",
                              220e6, 1),
    "mt5-small": _mt5(300e6, dim=512, n_layers=8, n_heads=6, head_dim=64, hidden_dim=1024),
    "mt5-base": _mt5(580e6, dim=768, n_layers=12, n_heads=12, head_dim=64, hidden_dim=2048),
    "mt5-large": _mt5(1.2e9, dim=1024, n_layers=24, n_heads=16, head_dim=64, hidden_dim=2816),
    "mt5-xl": _mt5(3.7e9, dim=2048, n_layers=24, n_heads=32, head_dim=64, hidden_dim=5120),
    "mt5-xxl": _mt5(13e9, dim=4096, n_layers=24, n_heads=64, head_dim=64, hidden_dim=10240),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The model config of preset `name`, with optional field overrides (e.g. vocab_size=...)."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise KeyError(f"unknown model preset {name!r}{hint}; known: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    return from_dict(REGISTRY[preset.family][0], {"family": preset.family, **preset.fields, **overrides},
                     source=f"preset {name}")
