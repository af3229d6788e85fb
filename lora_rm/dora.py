"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"): LoRA with each output row's length learned
apart from its direction.

    W' = m ⊙ (W + s B A) / ||W + s B A||_row            y = W' x + b

m (d_out,) is the trainable `lora_magnitude_vector`, started at ||W + s B A||_row so a fresh adapter (B = 0)
leaves the model unchanged; s is LoRA's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA). The norm n is a
constant in backward (detached, DoRA paper section 4.3, as PEFT does): m gets the gradient of the length, A and
B only that of the direction. Per output row i, with scale_i = m_i / n_i, the forward is LoRA's sum rescaled:

    y_i = scale_i (W x + s B A x)_i + b_i

With lora_dropout active PEFT keeps the clean x on the base and feeds the dropped x_d to the DoRA correction,
recomputing the base on it:  y = W x + b + (scale - 1) ⊙ W x_d + scale ⊙ s B A x_d.  We do the same.

The row norm without the d_out x d_in matrix. PEFT forms W + s B A in every forward (it pushes an identity
matrix through A and B to get B A) only to take its row norms. Expanding the square of row i instead:

    n_i^2 = ||W_i + s (B A)_i||^2
          = ||W_i||^2 + 2 s <W_i, B_i A> + s^2 ||B_i A||^2
          = ||W_i||^2 + 2 s B_i · (W A^T)_i + s^2 B_i (A A^T) B_i^T

||W_i||^2 does not change while W is frozen, so it is computed once and cached; W A^T is one (d_out x d_in) @
(d_in x r) product that reads W once and writes d_out x r; A A^T is r x r. Nothing W-sized is written.
Every term is a sum of products of the same numbers PEFT adds, so the two agree to float rounding
(tests/test_dora.py checks it against the direct norm in fp64 and fp32).

For a long batch (lora_fast.folding_pays: more than 2 d_in d_out / (d_in + d_out) tokens, fp32, no dropout) plain
LoRA computes (W + s B A) x; DoRA then folds too (FoldedDoRA), and takes n straight from the W + s B A it has just
built, the direct norm at the price of one read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import lora_fast


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight as (d_out, d_in): GPT-2's Conv1D stores it transposed, so a view, never a copy."""
    weight = layer.base_layer.weight
    return weight.T if layer.fan_in_fan_out else weight


@torch.no_grad()
def full_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + s B A||_row the direct way (PEFT's), in the adapter's dtype: for init, merge and the exact path."""
    weight = weight.to(lora_A.dtype)
    return torch.linalg.norm(weight + scaling * (lora_B @ lora_A), dim=1)


@torch.no_grad()
def row_norm(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, weight_sq: torch.Tensor
) -> torch.Tensor:
    """||W + s B A||_row by the expansion in the module docstring; weight_sq holds ||W_i||^2."""
    weight_A = weight.to(lora_A.dtype) @ lora_A.T  # (d_out, r): the one pass over W
    cross = (lora_B * weight_A).sum(dim=1)  # B_i · (W A^T)_i
    lora_sq = ((lora_B @ (lora_A @ lora_A.T)) * lora_B).sum(dim=1)  # B_i (A A^T) B_i^T
    norm_sq = weight_sq + 2 * scaling * cross + scaling**2 * lora_sq
    return norm_sq.clamp_min(0).sqrt()  # rounding can take an exactly-zero row a hair below 0


@torch.no_grad()
def cached_weight_sq(layer: nn.Module) -> torch.Tensor:
    """||W_i||^2 of the frozen base, recomputed only when W changes (in-place write, new storage, dtype, device)."""
    weight = layer.base_layer.weight
    key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, layer.lora_A.weight.dtype)
    cached = getattr(layer, "_dora_weight_sq", None)
    if cached is None or cached[0] != key:
        dense = dense_weight(layer).to(layer.lora_A.weight.dtype)
        cached = (key, (dense * dense).sum(dim=1))
        layer._dora_weight_sq = cached  # a plain attribute, not a buffer: never saved, never cast by .to()
    return cached[1]


def magnitude_scale(layer: nn.Module) -> torch.Tensor:
    """m / ||W + s B A||_row: differentiable in m only (the norm is detached)."""
    with torch.autocast(layer.lora_A.weight.device.type, enabled=False):  # the norm in the adapter's dtype
        if layer.fast_path:
            norm = row_norm(dense_weight(layer), layer.lora_A.weight, layer.lora_B.weight, layer.scaling,
                            cached_weight_sq(layer))
        else:
            norm = full_weight_norm(dense_weight(layer), layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    return layer.lora_magnitude_vector / norm


def dora_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y = scale ⊙ (W x + s B A x) + b, or PEFT's dropout form; PEFT's order of operations with fast_path off."""
    base = layer.base_layer
    if layer.fast_path and lora_fast.folding_pays(layer, x):
        return FoldedDoRA.apply(x, dense_weight(layer), base.bias, layer.lora_A.weight, layer.lora_B.weight,
                                layer.scaling, layer.lora_magnitude_vector, torch.is_grad_enabled())
    scale = magnitude_scale(layer)
    dropout_active = layer.training and not isinstance(layer.lora_dropout, nn.Identity)
    if not layer.fast_path or dropout_active or base._forward_hooks or base._forward_pre_hooks:
        return _peft_order(layer, x, scale, dropout_active)
    weight = dense_weight(layer)
    wx = F.linear(x, weight)  # W x in the base's dtype, without the bias
    x = x.to(layer.lora_A.weight.dtype)  # PEFT casts x to the adapter's dtype (fp32 for a half base)
    h = layer.lora_A(x).reshape(-1, layer.lora_A.out_features)  # (tokens, r)
    flat_wx = wx.reshape(-1, wx.shape[-1]).to(h.dtype)  # (tokens, d_out)
    summed = torch.addmm(flat_wx, h, layer.lora_B.weight.T, alpha=layer.scaling)  # W x + s B A x, one pass
    out = summed * scale if base.bias is None else torch.addcmul(base.bias.to(h.dtype), summed, scale)
    return out.view(wx.shape).to(wx.dtype)


class FoldedDoRA(torch.autograd.Function):
    """y = (m/n) ⊙ (x (W + s B A)^T) + b for a frozen W, n the row norms of that W + s B A (detached).

    As lora_fast.FoldedLoRA, A's and B's gradients go through h = x A^T, never a W-sized weight gradient. With
    g = dL/dy and g' = g ⊙ m/n (the gradient of the unscaled sum):
        dL/dm = sum_tokens g ⊙ (x (W + s B A)^T) / n,   dL/dB = s g'^T h,   dL/dA = s (g' B)^T x,
        dL/dx = g' (W + s B A).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, magnitude, grad_enabled):  # noqa: ANN001, ANN205
        x_2d = x.reshape(-1, x.shape[-1])
        folded = torch.addmm(weight, lora_B, lora_A, alpha=scaling)  # W + s B A, (d_out, d_in)
        norm = torch.linalg.vector_norm(folded, dim=1)
        scale = magnitude / norm
        summed = F.linear(x_2d, folded)  # (W + s B A) x, (tokens, d_out)
        out = summed * scale if bias is None else torch.addcmul(bias, summed, scale)
        if grad_enabled:  # under no_grad (inference, reentrant checkpointing's first pass) no backward will come
            h = (lora_A @ x_2d.T).T  # (tokens, r), column-major as in FoldedLoRA
            ctx.save_for_backward(x_2d, h, weight, lora_A, lora_B, summed, norm, scale)
            ctx.scaling = scaling
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x_2d, h, weight, lora_A, lora_B, summed, norm, scale = ctx.saved_tensors
        scaling = ctx.scaling
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, d_out)
        grad_magnitude = (grad_2d * summed).sum(dim=0) / norm if ctx.needs_input_grad[6] else None
        grad_summed = grad_2d * scale
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            folded = torch.addmm(weight, lora_B, lora_A, alpha=scaling)  # rebuilt, not kept: it is W-sized
            grad_x = (grad_summed @ folded).view(*grad_out.shape[:-1], -1)
        if ctx.needs_input_grad[3]:
            grad_A = ((lora_B.T @ grad_summed.T).T * scaling).T @ x_2d
        if ctx.needs_input_grad[4]:
            grad_B = (h.T @ grad_summed).T * scaling
        return grad_x, None, None, grad_A, grad_B, None, grad_magnitude, None


def _peft_order(layer: nn.Module, x: torch.Tensor, scale: torch.Tensor, dropout_active: bool) -> torch.Tensor:
    """PEFT's DoraLinearLayer.forward step by step: result + (scale - 1) W x' + scale s B A x'."""
    base = layer.base_layer
    result = base(x)
    x = x.to(layer.lora_A.weight.dtype)
    if dropout_active:  # the base is recomputed on the dropped x; `result` keeps the clean one
        x = layer.lora_dropout(x)
        base_result = F.linear(x, dense_weight(layer).to(x.dtype))
    else:
        base_result = result if base.bias is None else result - base.bias
    lora_result = layer.lora_B(layer.lora_A(x))
    return (result + (scale - 1) * base_result + scale * lora_result * layer.scaling).to(result.dtype)


@torch.no_grad()
def merged_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(m/n ⊙ (W + s B A) in W's layout and dtype, n): n is kept so unmerge can divide by the same factor."""
    lora_A, lora_B = layer.lora_A.weight, layer.lora_B.weight
    dense = dense_weight(layer).to(lora_A.dtype)
    norm = full_weight_norm(dense, lora_A, lora_B, layer.scaling)
    merged = (layer.lora_magnitude_vector / norm)[:, None] * (dense + layer.scaling * (lora_B @ lora_A))
    weight = layer.base_layer.weight
    return (merged.T if layer.fan_in_fan_out else merged).to(weight.dtype), norm


@torch.no_grad()
def unmerged_weight(layer: nn.Module, norm: torch.Tensor) -> torch.Tensor:
    """W = W' / (m/n) - s B A, with the n that merge used (PEFT's unmerge)."""
    lora_A, lora_B = layer.lora_A.weight, layer.lora_B.weight
    dense = dense_weight(layer).to(lora_A.dtype)
    original = dense / (layer.lora_magnitude_vector / norm)[:, None] - layer.scaling * (lora_B @ lora_A)
    weight = layer.base_layer.weight
    return (original.T if layer.fan_in_fan_out else original).to(weight.dtype)
