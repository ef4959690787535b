"""Parameter-efficient fine-tuning as swaps on a built model: LoRA layers (optionally over a
4-bit base for QLoRA), PEFT-format adapter files, and freezing by name or layer range."""

from llmlab.peft.freeze import freeze
from llmlab.peft.io import is_adapter, load_adapter, save_adapter
from llmlab.peft.lora import (AdapterError, LoraConfig, LoRALinear, apply_lora, disable_adapters, lora_state_dict,
                              merge_and_unload, merge_lora, trainable_parameters, unmerge_lora)

__all__ = ["AdapterError", "LoRALinear", "LoraConfig", "apply_lora", "disable_adapters", "freeze", "is_adapter",
           "load_adapter", "lora_state_dict", "merge_and_unload", "merge_lora", "save_adapter",
           "trainable_parameters", "unmerge_lora"]
