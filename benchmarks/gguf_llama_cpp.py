"""GGUF exports run in llama.cpp: its logits against the model's, for a dense LLaMA and a Mixtral-style MoE.

Each tiny model (random weights, a byte-level BPE tokenizer trained here) is exported with
`llmlab.models.gguf.export_gguf` as F32 and as Q8_0, loaded by llama.cpp through `llama-cpp-python`
(with a float32 KV cache: its default float16 cache alone moves logits by ~5e-3), and fed the same
token ids; the script prints the largest logit difference and how often the two pick the same next
token. Needs `pip install llama-cpp-python` (it compiles llama.cpp: about 18
minutes on two cores); the unit tests check the files against a NumPy reimplementation instead.

    python benchmarks/gguf_llama_cpp.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from llmlab.models import LlamaConfig, build_model
from llmlab.models.gguf import export_gguf
from llmlab.models.moe import MoEConfig
from llmlab.tokenizer import train_bpe


def _model(vocab_size: int, moe: MoEConfig | None) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256,
                      max_seq_len=128, moe=moe)
    model = build_model(cfg).eval()
    with torch.no_grad():  # wider than the init, so that the next token is a clear choice
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=48, help="length of the token sequence fed to both")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("needs llama.cpp's Python binding: pip install llama-cpp-python") from None

    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tok"
        train_bpe([f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)], 320).save(tok)
        ids = np.random.default_rng(0).integers(3, 320, args.tokens).tolist()
        print(f"llama.cpp {llama_cpp.__version__}; {args.tokens} tokens")
        for name, moe in [("dense", None), ("mixtral-style", MoEConfig(n_experts=4, top_k=2))]:
            model = _model(320, moe)
            with torch.no_grad():
                want = model(torch.tensor([ids]))[0].numpy()
            for outtype in ("f32", "q8_0"):
                path = export_gguf(model, tok, Path(tmp) / f"{name}-{outtype}.gguf", outtype=outtype)
                llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2,
                                      type_k=0, type_v=0)  # an f32 KV cache (GGML_TYPE_F32), not f16
                llm.eval(ids)
                got = np.asarray(llm.scores[:len(ids)], dtype=np.float32)
                same = float((got.argmax(-1) == want.argmax(-1)).mean())
                print(f"  {name:14s} {outtype:5s} max |logit difference| {np.abs(got - want).max():.2e} "
                      f"(logits up to {np.abs(want).max():.2f}); same next token {same:.0%}")
                llm.close()


if __name__ == "__main__":
    main()
