"""LoRALinear's fast path: the same sum as base(x) + lora_B(lora_A(dropout(x))) * scaling, in fewer passes.

choose_path picks one of three arrangements per call (benchmarks/NOTES.md has the measurements):

- in-place, for a half (bf16/fp16) or 4-bit base, or an fp32 base under autocast: the low-rank products run in
  the dtype of the base's output (A and B cast from their fp32 master weights), and the update is added into the
  base matmul's own output, `out.addmm_(h, B^T, alpha=s)`; x's gradient g W + s (g B) A is accumulated the same
  way. No activation-sized fp32 tensor is made (PEFT casts x and the base output to the fp32 adapter), and
  backward keeps x itself and h = x A^T only. W is never folded with s B A here: in bf16 that rounds most of a
  small update away. A 4-bit W is dequantized for the matmul, as bitsandbytes' own forward and backward do.
- unfolded, fp32/fp64, PEFT's order: W x + s * B (A x), with the scaling and the add folded into one addmm, so no
  (tokens, d_out) tensor is written twice, and B^T made contiguous, so autograd computes B's gradient as
  h^T @ grad, the layout BLAS is fast at. Cheap for few tokens, and the fp32 way with dropout.
- folded, fp32/fp64: (W + s B A) x. Same sum by associativity: W x + s B (A x) = (W + s B A) x. A's and B's
  gradients are still taken through h = A x (never through a d_out x d_in weight gradient): with g = dL/dy,
      dL/dB = s g h^T,   dL/dA = s (B^T g) x^T,   dL/dx = (W + s B A)^T g.
  For a batch of more than 2 d_in d_out / (d_in + d_out) tokens the one (d_out x r x d_in) product that builds
  W + s B A, made in forward and again in backward, is cheaper than the two (tokens x r x d) products it
  replaces (h B^T forward, grad_h A backward), and x's gradient becomes one base-sized matmul.

Where none applies (a half or 4-bit base with active lora_dropout, a trainable or hooked one, 4-bit under autocast)
lora.py runs its plain equation, PEFT's exact order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HALF = (torch.float16, torch.bfloat16)


def lora_forward(layer: nn.Module, x: torch.Tensor, path: str) -> torch.Tensor:
    """LoRALinear's output for an unmerged layer, by the arrangement choose_path picked for this call."""
    if path == "in-place":
        return InPlaceLoRA.apply(x, layer.lora_A.weight, layer.lora_B.weight, layer, compute_dtype(layer, x))
    if path == "folded":
        base = layer.base_layer
        weight = base.weight.T if layer.fan_in_fan_out else base.weight  # (d_out, d_in)
        return FoldedLoRA.apply(x, weight, base.bias, layer.lora_A.weight, layer.lora_B.weight, layer.scaling,
                                torch.is_grad_enabled())
    result = layer.base_layer(x)
    # PEFT casts x to the adapter's dtype and the sum back to the base output's dtype.
    h = layer.lora_A(layer.lora_dropout(x.to(layer.lora_A.weight.dtype)))  # (..., r)
    flat_result = result.reshape(-1, result.shape[-1]).to(h.dtype)  # (tokens, d_out)
    lora_B_T = layer.lora_B.weight.T.contiguous()  # (r, d_out)
    out = torch.addmm(flat_result, h.reshape(-1, h.shape[-1]), lora_B_T, alpha=layer.scaling)
    return out.view(result.shape).to(result.dtype)


def choose_path(layer: nn.Module, x: torch.Tensor) -> str | None:
    """'in-place', 'folded' or 'unfolded'; None where only lora.py's equation computes the sum (module docstring)."""
    if compute_dtype(layer, x) is None:  # fp32/fp64 arithmetic: the two paths as they were
        return "folded" if folding_pays(layer, x) else "unfolded"
    base = layer.base_layer
    autocast = torch.is_autocast_enabled(x.device.type)
    in_place = (
        # Active dropout feeds A a second activation, which backward would keep with its mask (the default p is 0).
        not (layer.training and not isinstance(layer.lora_dropout, nn.Identity))
        and not any(p.requires_grad for p in base.parameters(recurse=False))  # W and b get no gradient here
        and not (base._forward_hooks or base._forward_pre_hooks)  # the base module itself is never called
        and not (is_4bit(base) and autocast)  # bitsandbytes casts around autocast its own way
        and (autocast or is_4bit(base) or x.dtype == base.weight.dtype)  # else F.linear's dtype error, as PEFT's
    )
    return "in-place" if in_place else None


def compute_dtype(layer: nn.Module, x: torch.Tensor) -> torch.dtype | None:
    """The dtype of the base's output where it is computed in half precision or 4-bit, else None (fp32/fp64)."""
    base = layer.base_layer
    if is_4bit(base):
        return x.dtype  # bitsandbytes computes in its compute_dtype and casts the output back to x's dtype
    if torch.is_autocast_enabled(x.device.type) and base.weight.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return base.weight.dtype if base.weight.dtype in HALF else None


def is_4bit(base: nn.Module) -> bool:
    """qlora.is_4bit (by name: bitsandbytes is optional; importing qlora here would be circular)."""
    return type(base).__name__ == "Linear4bit"


def dense_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """W as (d_out, d_in) in the dtype the base multiplies in: a 4-bit W dequantized (a new tensor each call)."""
    base = layer.base_layer
    if is_4bit(base):
        import bitsandbytes

        weight = bitsandbytes.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
        return weight.to(base.compute_dtype or dtype)
    return (base.weight.T if layer.fan_in_fan_out else base.weight).to(dtype)


def folding_pays(layer: nn.Module, x: torch.Tensor) -> bool:
    """Fold only when it is the same sum in the same dtype and saves FLOPs (see the module docstring)."""
    base = layer.base_layer
    d_in, d_out = layer.lora_A.in_features, layer.lora_B.out_features
    tokens = x.numel() // d_in
    return (
        # Independent of grad mode, so reentrant checkpointing's no-grad pass and its recompute agree bit for bit.
        tokens * (d_in + d_out) > 2 * d_in * d_out
        and x.dtype == base.weight.dtype == layer.lora_A.weight.dtype  # in half precision W + s B A rounds s B A away
        and not torch.is_autocast_enabled(x.device.type)
        and (isinstance(layer.lora_dropout, nn.Identity) or not layer.training)  # dropout feeds A only, not W
        and not any(p.requires_grad for p in base.parameters(recurse=False))
        and not (base._forward_hooks or base._forward_pre_hooks)  # e.g. accelerate's offload hooks must run
    )


class FoldedLoRA(torch.autograd.Function):
    """y = x (W + s B A)^T + b for a frozen W, with A's and B's gradients taken through h = x A^T as autograd would."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, grad_enabled):  # noqa: ANN001, ANN205 (autograd's)
        x_2d = x.reshape(-1, x.shape[-1])
        out = F.linear(x_2d, torch.addmm(weight, lora_B, lora_A, alpha=scaling), bias)
        if grad_enabled:  # under no_grad (inference, reentrant checkpointing's first pass) no backward will come
            h = (lora_A @ x_2d.T).T  # (tokens, r), for B's gradient; column-major: BLAS's faster layout here
            ctx.save_for_backward(x_2d, h, weight, lora_A, lora_B)  # W + s B A is rebuilt, not kept: it is W-sized
            ctx.scaling = scaling
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x_2d, h, weight, lora_A, lora_B = ctx.saved_tensors
        scaling = ctx.scaling
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, d_out)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_2d @ torch.addmm(weight, lora_B, lora_A, alpha=scaling)).view(*grad_out.shape[:-1], -1)
        # Transposed products: BLAS is up to 10x faster at r-wide results in these layouts (NOTES.md).
        if ctx.needs_input_grad[3]:
            grad_h = (lora_B.T @ grad_2d.T).T * scaling  # (tokens, r)
            grad_A = grad_h.T @ x_2d
        if ctx.needs_input_grad[4]:
            grad_B = (h.T @ grad_2d).T * scaling
        return grad_x, None, None, grad_A, grad_B, None, None


class InPlaceLoRA(torch.autograd.Function):
    """y = W x + b + s B (A x) in the base output's dtype, the update added into W x's own buffer; keeps x and h.

    With g = dL/dy and h = x A^T (tokens, r):
        dL/dx = g W + s (g B) A,   dL/dA = s (g B)^T x,   dL/dB = s g^T h.
    The products with A and B run in the compute dtype; their gradients go back in A's and B's dtype (fp32).
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, layer, dtype):  # noqa: ANN001, ANN205 (autograd's)
        weight = dense_weight(layer, dtype)  # (d_out, d_in)
        bias = layer.base_layer.bias
        # Casts that are no-ops on a half base: autocast's of an fp32 x, bitsandbytes' to and from its compute dtype.
        x_2d = x.reshape(-1, x.shape[-1]).to(dtype)  # (tokens, d_in)
        out = F.linear(x_2d.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype)).to(dtype)
        h = x_2d @ lora_A.to(dtype).T  # (tokens, r)
        out.addmm_(h, lora_B.to(dtype).T, alpha=layer.scaling)  # (tokens, d_out): W x + b + s h B^T, in place
        ctx.save_for_backward(x, h, lora_A, lora_B)  # x itself, not a copy
        ctx.layer, ctx.dtype = layer, dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, h, lora_A, lora_B = ctx.saved_tensors
        dtype, scaling = ctx.dtype, ctx.layer.scaling
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, d_out), in dtype
        grad_h = grad_2d @ lora_B.to(dtype)  # g B, (tokens, r)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            weight = dense_weight(ctx.layer, dtype)  # dequantized again for a 4-bit base: never kept between passes
            grad_x = (grad_2d.to(weight.dtype) @ weight).to(dtype)  # (tokens, d_in)
            grad_x.addmm_(grad_h, lora_A.to(dtype), alpha=scaling)
            grad_x = grad_x.view(*x.shape[:-1], -1).to(x.dtype)  # autocast: back to an fp32 x's own dtype
        if ctx.needs_input_grad[1]:
            grad_A = (grad_h.T @ x.reshape(-1, x.shape[-1]).to(dtype)).to(lora_A.dtype) * scaling
        if ctx.needs_input_grad[2]:
            grad_B = (grad_2d.T @ h).to(lora_B.dtype) * scaling
        return grad_x, grad_A, grad_B, None, None
