"""Quantized layers applied to a built model as module swaps: NF4 weights for QLoRA (`nf4`).

Nothing here imports bitsandbytes until a layer is quantized or run.
"""

from __future__ import annotations

from llmlab.quant.nf4 import (NF4_CODE, NF4Experts, NF4Linear, dequantize_model, load_quantized, nf4_error_bound,
                              quantize_model)

__all__ = ["NF4_CODE", "NF4Experts", "NF4Linear", "dequantize_model", "load_quantized", "nf4_error_bound",
           "quantize_model"]
