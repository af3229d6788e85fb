"""The LoRA math: one wrapped layer computing y = W x + (alpha/r) * B A dropout(x).

      x ──► W (frozen, the very same nn.Linear / Conv1D object) ──────────────┐
      │                                                                       (+) ──► y
      └──► dropout ──► A (r × d_in) ──► B (d_out × r) ──► × scaling ──────────┘

Init (PEFT's and the LoRA paper's): A kaiming-uniform with a=sqrt(5) (nn.Linear's default), B zero,
so a fresh adapter leaves the model unchanged. scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.
(PiSSA/OLoRA start A, B from W's SVD/QR and subtract them from W instead: inits.py.)
GPT-2's Conv1D stores W as (d_in, d_out); the delta is transposed once for it (PEFT's fan_in_fan_out).

forward() is the equation, with PEFT's casts. Its one exception is lora_fast.py, which computes the same sum in
fewer passes over memory: in fp32 as one addmm (or, for long batches, as (W + s B A) x); on a half or 4-bit base,
or under autocast, in the base's own dtype with the update added in place. Setting the attribute
`layer.fast_path = False` keeps PEFT's exact order of operations, for comparisons bit for bit.

use_dora=True makes it DoRA: the same sum, each output row rescaled to a trained length m (dora.py has the math).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import dora, inits, lora_fast


class LoRALinear(nn.Module):
    """Wraps a frozen nn.Linear or Conv1D with a trainable low-rank update; merging is explicit.

    lora_alpha may be any positive number: scaling = lora_alpha / r is a float either way (LoraConfig holds an
    int, as PEFT's config does).
    """

    def __init__(
        self,
        base_layer: nn.Linear | Conv1D,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise TypeError(f"LoRALinear wraps nn.Linear or Conv1D, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        weight = base_layer.weight
        if self.fan_in_fan_out:
            d_in, d_out = weight.shape
        else:  # not weight.shape: a 4-bit Linear4bit stores its weight packed, (d_out * d_in / 2, 1) uint8
            d_in, d_out = base_layer.in_features, base_layer.out_features
        # PEFT (autocast_adapter_dtype=True) keeps the adapter of a half or 4-bit base in fp32, for the optimizer.
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A, self.lora_B = new_lora_pair(d_in, r, d_out, init_lora_weights, dtype, weight.device)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        if inits.is_weight_init(init_lora_weights):  # PiSSA/OLoRA: A, B from W's SVD/QR; W becomes W - s B A
            inits.init_from_base_weight(self, init_lora_weights)
        self.merged = False
        self.fast_path = True  # False: PEFT's order of operations exactly (the same sum, slower)
        self.use_dora = use_dora
        if use_dora:
            if not weight.is_floating_point():
                raise ValueError("LoRALinear: use_dora with a 4-bit base is not supported (its row norms need W "
                                 "dequantized); train DoRA on a bf16/fp32 base or drop use_dora")
            self.lora_magnitude_vector = nn.Parameter(self.initial_magnitude())

    def initial_magnitude(self) -> torch.Tensor:
        """DoRA's m at init: ||W + s B A||_row, so the adapter starts as plain LoRA (a no-op when B = 0)."""
        return dora.full_weight_norm(dora.dense_weight(self), self.lora_A.weight, self.lora_B.weight, self.scaling)

    def reset_parameters(self, init_lora_weights: bool | str = True) -> None:
        """Draw A and B again with PEFT's init (draw_lora_weights): B = 0 makes the adapter an exact no-op."""
        if inits.is_weight_init(init_lora_weights):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is taken from the base weight once, in __init__")
        draw_lora_weights(self.lora_A.weight, self.lora_B.weight, init_lora_weights)
        if self.use_dora:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self.initial_magnitude())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # W already holds W + scaling * B A
            return self.base_layer(x)
        if self.use_dora:
            return dora.dora_forward(self, x)
        path = lora_fast.choose_path(self, x) if self.fast_path else None
        if path is not None:  # the one exception: the same sum in fewer passes over memory (lora_fast.py)
            return lora_fast.lora_forward(self, x, path)
        result = self.base_layer(x)
        # PEFT casts x to the adapter's dtype and the sum back to the base output's dtype.
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return (result + self.lora_B(self.lora_A(x)) * self.scaling).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into W so inference costs nothing extra; refuses a non-finite result."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge: already merged")
        weight = self.base_layer.weight
        if not weight.is_floating_point():
            raise ValueError(
                "LoRALinear.merge: the base weight is 4-bit; merging into it would re-quantize W + s B A and round "
                "the update away. Dequantize first (lora_rm.qlora.dequantize_4bit_layers; `lora-rm merge` does it)"
            )
        if self.use_dora:
            merged, self._dora_merge_norm = dora.merged_weight(self)
        else:
            delta = delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling, self.fan_in_fan_out)
            merged = weight + delta.to(weight.dtype)
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
        if self.use_dora:
            weight.copy_(dora.unmerged_weight(self, self._dora_merge_norm))
        else:
            delta = delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling, self.fan_in_fan_out)
            weight.sub_(delta.to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        dora_text = ", use_dora=True" if self.use_dora else ""
        return f"r={self.lora_A.out_features}, scaling={self.scaling:g}{dora_text}, merged={self.merged}"


def new_lora_pair(
    d_in: int, r: int, d_out: int, init: bool | str, dtype: torch.dtype, device: torch.device | None = None
) -> tuple[nn.Linear, nn.Linear]:
    """A (d_in -> r) and B (r -> d_out) as a new LoRALinear holds them; the one place their RNG draws are ordered.

    From the global RNG: A's then B's nn.Linear default init, then draw_lora_weights. sharded_load draws the
    adapter through it too, so an --fsdp run starts from the very weights of a one-process run.
    """
    lora_A = nn.Linear(d_in, r, bias=False, device=device, dtype=dtype)
    lora_B = nn.Linear(r, d_out, bias=False, device=device, dtype=dtype)
    draw_lora_weights(lora_A.weight, lora_B.weight, init)
    return lora_A, lora_B


def draw_lora_weights(lora_A: torch.Tensor, lora_B: torch.Tensor, init: bool | str = True) -> None:
    """PEFT's init in place: B = 0 makes a fresh adapter an exact no-op; False keeps both as they are (tests).

    True: A kaiming-uniform (a=sqrt(5)); "gaussian": A normal with std 1/r. lora_A is (r, d_in), lora_B (d_out, r).
    """
    if init is False or inits.is_weight_init(init):  # PiSSA/OLoRA set both from the base weight (inits.py)
        return
    if init == "gaussian":
        nn.init.normal_(lora_A, std=1 / lora_A.shape[0])
    else:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    nn.init.zeros_(lora_B)


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """scaling * B @ A; half precision is multiplied in fp32 and cast back, as PEFT does on CPU."""
    dtype = lora_B.dtype
    if dtype in (torch.float16, torch.bfloat16):
        lora_A, lora_B = lora_A.float(), lora_B.float()
    delta = (lora_B @ lora_A) * scaling
    return (delta.T if fan_in_fan_out else delta).to(dtype)
