"""4-bit (QLoRA) bases: load the frozen linear layers as nf4, keep everything that trains in fp32, merge by
dequantizing first.

    frozen base linear layers   nf4 (4-bit NormalFloat, double-quantized), computed in bnb_4bit_compute_dtype
    embeddings, norms, biases   base_dtype (fp32 by default; bf16 halves them)
    LoRA A and B, the head      fp32 master weights: AdamW's small updates survive, the loss is fp32

The update is computed in the layer's output dtype (x's) and added into the output of the matmul with the
dequantized W (lora_fast.py's in-place path); lora.py's plain equation adds it in the adapter's fp32, as PEFT's
bnb.Linear4bit does. bitsandbytes is an optional dependency: `pip install 'lora-rm[qlora]'`.
"""

from __future__ import annotations

import torch
from torch import nn

from .inject import HEAD_NAMES


def require_bitsandbytes():
    """The bitsandbytes module, or an error that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError(
            "--load-in-4bit needs bitsandbytes: pip install 'lora-rm[qlora]' (or pip install bitsandbytes)"
        ) from error
    return bitsandbytes


def quantization_config(compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for QLoRA's nf4 with double quantization; the head stays unquantized."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        # Naming any module drops transformers' default skips (which keep Llama's `score` but quantize BERT's
        # `classifier`, whose int weights then cannot train): name every head kind ourselves.
        llm_int8_skip_modules=list(HEAD_NAMES),
    )


def is_4bit(layer: nn.Module) -> bool:
    """True for a bitsandbytes Linear4bit (checked by name: bitsandbytes need not be installed)."""
    return type(layer).__name__ == "Linear4bit"


def prepare_4bit_model(model: nn.Module) -> nn.Module:
    """What PEFT's prepare_model_for_kbit_training does, by hand, each step kept or dropped for a reward model.

    - freeze every parameter: add_lora does it (and then unfreezes the head, which must train).
    - cast non-quantized half parameters to fp32: only the head needs it (add_lora keeps it fp32); embeddings
      and norms stay in base_dtype, as they do for a bf16 base (a Qwen2.5-0.5B embedding in fp32 costs 0.5 GB).
    - input-grad hook and gradient checkpointing: enable_gradient_checkpointing does both when asked.
    - ours alone: bitsandbytes 0.50 repacks a 4-bit weight in place on CPUs with AVX512-BF16 at the first
      eval forward without grad; a later training forward then loses x's gradient and dequantizing reads the
      repacked bytes as garbage. Turned off per layer.
    """
    for module in model.modules():
        if is_4bit(module):
            module.support_avx512bf16_for_cpu = False
    return model


@torch.no_grad()
def dequantize_4bit_layers(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every Linear4bit (adapted or not) with an nn.Linear holding its dequantized weight, in place.

    Merging into nf4 would re-quantize W + s B A and round the update away (PEFT warns); a merge from a 4-bit
    base dequantizes first, so the merged model holds exactly the weights the adapter was trained against.
    """
    bitsandbytes = require_bitsandbytes()
    for name, module in list(model.named_modules()):
        if not is_4bit(module):
            continue
        weight = bitsandbytes.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype,
                          device=weight.device)
        dense.weight.copy_(weight.to(dtype))
        if module.bias is not None:
            dense.bias.copy_(module.bias.to(dtype))
        dense.requires_grad_(False)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, dense)
    if getattr(model, "hf_quantizer", None) is not None:  # what transformers itself does after dequantizing
        model.hf_quantizer.remove_quantization_config(model)
    model.is_loaded_in_4bit = False
    return model
