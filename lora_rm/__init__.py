"""lora-rm: LoRA reward models in plain PyTorch, equal to PEFT + TRL and easier to read."""

from .adapter_io import load_adapter, save_adapter
from .config import LoraConfig
from .inject import (
    add_lora,
    enable_gradient_checkpointing,
    enable_input_require_grads,
    format_parameter_counts,
    merge_lora,
    parameter_counts,
)
from .lora import LoRALinear

__all__ = [
    "LoRALinear",
    "LoraConfig",
    "add_lora",
    "enable_gradient_checkpointing",
    "enable_input_require_grads",
    "format_parameter_counts",
    "load_adapter",
    "merge_lora",
    "parameter_counts",
    "save_adapter",
]
__version__ = "0.1.0"
