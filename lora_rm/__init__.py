"""lora-rm: LoRA reward models in plain PyTorch, equal to PEFT + TRL and easier to read."""

import importlib

# The public API, by the module that defines it. Imported on first use (PEP 562), so that `lora-rm --help`
# does not wait for torch and transformers.
_PUBLIC = {
    "LoRALinear": "lora",
    "LoraConfig": "config",
    "add_lora": "inject",
    "enable_gradient_checkpointing": "inject",
    "enable_input_require_grads": "inject",
    "format_parameter_counts": "inject",
    "merge_lora": "inject",
    "parameter_counts": "inject",
    "load_adapter": "adapter_io",
    "save_adapter": "adapter_io",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'lora_rm' has no attribute {name!r}")
