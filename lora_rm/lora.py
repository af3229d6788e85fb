"""The LoRA math: one wrapped layer computing y = W x + (alpha/r) * B A dropout(x).

      x ──► W (frozen, the very same nn.Linear / Conv1D object) ──────────────┐
      │                                                                       (+) ──► y
      └──► dropout ──► A (r × d_in) ──► B (d_out × r) ──► × scaling ──────────┘

Init (PEFT's and the LoRA paper's): A kaiming-uniform with a=sqrt(5) (nn.Linear's default), B zero,
so a fresh adapter leaves the model unchanged. scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.
GPT-2's Conv1D stores W as (d_in, d_out); the delta is transposed once for it (PEFT's fan_in_fan_out).

Two ways to compute the same sum, picked per call by cost (benchmarks/NOTES.md has the measurements):
- unfolded, PEFT's order: W x + s * B (A x). Cheap for few tokens; the only way with dropout or a half base.
- folded: (W + s B A) x, with A's and B's gradients still taken through h = A x. For a batch of more than
  2 d_in d_out / (d_in + d_out) tokens one (d_out x r x d_in) product, made in forward and again in backward, is
  cheaper than the two (tokens x r x d) products it replaces (h B^T forward, grad_h A backward), and x's
  gradient becomes one base-sized matmul.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


class LoRALinear(nn.Module):
    """Wraps a frozen nn.Linear or Conv1D with a trainable low-rank update; merging is explicit."""

    def __init__(
        self,
        base_layer: nn.Linear | Conv1D,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise TypeError(f"LoRALinear wraps nn.Linear or Conv1D, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        d_in, d_out = base_layer.weight.shape if self.fan_in_fan_out else base_layer.weight.shape[::-1]
        weight = base_layer.weight
        # PEFT (autocast_adapter_dtype=True) keeps the adapter of a half-precision base in fp32, for the optimizer.
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.lora_A = nn.Linear(d_in, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(r, d_out, bias=False, device=weight.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False
        self.reset_parameters(init_lora_weights)

    def reset_parameters(self, init_lora_weights: bool | str = True) -> None:
        """B = 0 makes a fresh adapter an exact no-op; False keeps nn.Linear's random init on both (tests)."""
        if init_lora_weights is False:
            return
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.lora_A.out_features)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in the base weight's layout, (d_out, d_in) or Conv1D's (d_in, d_out)."""
        return delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling, self.fan_in_fan_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self._folding_pays(x):
            weight = self.base_layer.weight.T if self.fan_in_fan_out else self.base_layer.weight  # (d_out, d_in)
            return _FoldedLoRA.apply(x, weight, self.base_layer.bias, self.lora_A.weight, self.lora_B.weight,
                                     self.scaling, torch.is_grad_enabled())
        result = self.base_layer(x)
        # PEFT casts x to the adapter's dtype and the sum back to the base output's dtype.
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
        # PEFT's result + lora_B(h) * scaling, arranged for speed: addmm folds the scaling and the add into the
        # second matmul, so no (tokens, d_out) tensor is written twice; with B^T contiguous, autograd computes
        # B's gradient as h^T @ grad, the layout BLAS is fast at.
        flat_result = result.reshape(-1, result.shape[-1]).to(h.dtype)  # (tokens, d_out)
        lora_B_T = self.lora_B.weight.T.contiguous()  # (r, d_out)
        out = torch.addmm(flat_result, h.reshape(-1, h.shape[-1]), lora_B_T, alpha=self.scaling)
        return out.view(result.shape).to(result.dtype)

    def _folding_pays(self, x: torch.Tensor) -> bool:
        """Fold only when it is the same sum in the same dtype and saves FLOPs (see the module docstring)."""
        base = self.base_layer
        d_in, d_out = self.lora_A.in_features, self.lora_B.out_features
        tokens = x.numel() // d_in
        return (
            # Independent of grad mode, so reentrant checkpointing's no-grad pass and its recompute agree bit for bit.
            tokens * (d_in + d_out) > 2 * d_in * d_out
            and x.dtype == base.weight.dtype == self.lora_A.weight.dtype  # a half base keeps PEFT's fp32 adapter path
            and not torch.is_autocast_enabled(x.device.type)
            and (isinstance(self.lora_dropout, nn.Identity) or not self.training)  # dropout feeds A only, not W
            and not any(p.requires_grad for p in base.parameters(recurse=False))
            and not (base._forward_hooks or base._forward_pre_hooks)  # e.g. accelerate's offload hooks must run
        )

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into W so inference costs nothing extra; refuses a non-finite result."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge: already merged")
        weight = self.base_layer.weight
        merged = weight + self.delta_weight().to(weight.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError("LoRALinear.merge: the merged weight has NaN/inf; the adapter is broken")
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of W (exact up to float rounding)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: not merged")
        weight = self.base_layer.weight
        weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.lora_A.out_features}, scaling={self.scaling:g}, merged={self.merged}"


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """scaling * B @ A; half precision is multiplied in fp32 and cast back, as PEFT does on CPU."""
    dtype = lora_B.dtype
    if dtype in (torch.float16, torch.bfloat16):
        lora_A, lora_B = lora_A.float(), lora_B.float()
    delta = (lora_B @ lora_A) * scaling
    return (delta.T if fan_in_fan_out else delta).to(dtype)


class _FoldedLoRA(torch.autograd.Function):
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
