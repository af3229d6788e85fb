"""LoRALinear's fast path: the same sum as base(x) + lora_B(lora_A(dropout(x))) * scaling, in fewer passes.

Two arrangements, picked per call by cost (benchmarks/NOTES.md has the measurements):

- unfolded, PEFT's order: W x + s * B (A x), with the scaling and the add folded into one addmm, so no
  (tokens, d_out) tensor is written twice, and B^T made contiguous, so autograd computes B's gradient as
  h^T @ grad, the layout BLAS is fast at. Cheap for few tokens; the only way with dropout or a half base.
- folded: (W + s B A) x. Same sum by associativity: W x + s B (A x) = (W + s B A) x. A's and B's gradients are
  still taken through h = A x (never through a d_out x d_in weight gradient): with g = dL/dy,
      dL/dB = s g h^T,   dL/dA = s (B^T g) x^T,   dL/dx = (W + s B A)^T g.
  For a batch of more than 2 d_in d_out / (d_in + d_out) tokens the one (d_out x r x d_in) product that builds
  W + s B A, made in forward and again in backward, is cheaper than the two (tokens x r x d) products it
  replaces (h B^T forward, grad_h A backward), and x's gradient becomes one base-sized matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def lora_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LoRALinear's output for an unmerged layer, folded when that is cheaper and the same sum."""
    if folding_pays(layer, x):
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


def folding_pays(layer: nn.Module, x: torch.Tensor) -> bool:
    """Fold only when it is the same sum in the same dtype and saves FLOPs (see the module docstring)."""
    base = layer.base_layer
    d_in, d_out = layer.lora_A.in_features, layer.lora_B.out_features
    tokens = x.numel() // d_in
    return (
        # Independent of grad mode, so reentrant checkpointing's no-grad pass and its recompute agree bit for bit.
        tokens * (d_in + d_out) > 2 * d_in * d_out
        and x.dtype == base.weight.dtype == layer.lora_A.weight.dtype  # a half base keeps PEFT's fp32 adapter path
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
