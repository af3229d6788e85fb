"""PiSSA and OLoRA: an adapter that starts ON the base weight's main directions, with W replaced by the rest.

Default LoRA starts from B = 0: the update is zero and A a random direction. These two inits read A and B off the
frozen weight W (d_out x d_in) itself, then subtract what they took, so the model computes the same function:

    PiSSA:  W = V S U^T (SVD), top r:  B = V_r sqrt(S_r / s),  A = sqrt(S_r / s) U_r^T     (s = the adapter's scaling)
    OLoRA:  W = Q R (QR), first r:     B = Q_r,                A = R_r
    both:   W_res = W - s B A,  so  W_res x + s B A x = W x  at init

Why: the trainable pair now holds W's largest singular directions (PiSSA) or an orthonormal basis of its leading
columns (OLoRA), so the first steps change the directions that matter most, and both A and B get gradients from step
one (with B = 0, A's gradient is zero at first). "pissa_niter_K" uses torch.svd_lowrank's randomized SVD with K
power iterations: seconds instead of minutes on a 4096-wide layer, an approximation of the top r, drawn from the
global RNG.

The catch is the base: W_res is not the model you downloaded. save_adapter therefore writes the trained adapter as
a plain LoRA on the ORIGINAL W (PEFT's save_pretrained(path_initial_model_for_weight_conversion=...)):

    W_res + s B A = W + s (B A - B0 A0) = W + s [B, -B0] [A; A0]      (A0, B0: the pair at init)

a rank-2r adapter with lora_alpha doubled (rsLoRA: times sqrt 2), so the scaling s stays the same.

As PEFT: computed in fp32 for fp32/fp16/bf16 bases, W_res cast back to the base's dtype. Beyond PEFT: an fp64 base
is decomposed in fp64 (PEFT refuses it), and OLoRA transposes GPT-2's Conv1D weight as PiSSA does (PEFT 0.21's
olora_init does not, and fails on it).
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from .config import LoraConfig, is_weight_init  # noqa: F401 (lora.py asks inits.is_weight_init)

NITER_PATTERN = re.compile(r"pissa_niter_(\d+)")


@torch.no_grad()
def init_from_base_weight(layer: nn.Module, init: str) -> None:
    """Set a LoRALinear's A, B from its base weight by PiSSA/OLoRA and replace W by W_res; keeps A0, B0 for saving."""
    base = layer.base_layer
    weight = base.weight
    if not weight.is_floating_point():
        raise ValueError(
            f"init_lora_weights={init!r} needs the base weight in full precision to decompose it; this base is "
            "4-bit. Run the init on the fp32/bf16 base instead (PEFT's way: save W_res, then quantize that)"
        )
    dtype = weight.dtype
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = weight.to(compute_dtype)
    w = w.T if layer.fan_in_fan_out else w  # (d_out, d_in)
    r, scaling = layer.lora_A.out_features, layer.scaling
    if r > min(w.shape):
        raise ValueError(f"init_lora_weights={init!r}: r={r} exceeds the rank a {tuple(w.shape)} weight can give")
    if init == "olora":
        lora_A, lora_B = _olora(w, r)
    else:
        lora_A, lora_B = _pissa(w, r, scaling, init)
    # (s B) A, in PEFT's order of operations: the same rounding as its W_res.
    residual = w - scaling * lora_B @ lora_A
    residual = residual.T if layer.fan_in_fan_out else residual
    weight.copy_(residual.to(dtype))
    layer.lora_A.weight.copy_(lora_A)
    layer.lora_B.weight.copy_(lora_B)
    layer.initial_lora = (lora_A.clone(), lora_B.clone())  # A0, B0: a plain tensor pair, not a buffer DDP would sync


def _pissa(w: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) from W's top r singular triplets, each side taking sqrt(S / scaling); PEFT's pissa_init."""
    niter = NITER_PATTERN.fullmatch(init)
    if niter is None:
        V, S, Uh = torch.linalg.svd(w, full_matrices=False)
        Vr, Sr, Uhr = V[:, :r], S[:r] / scaling, Uh[:r]
    else:
        Vr, Sr, Ur = torch.svd_lowrank(w, r, niter=int(niter.group(1)))
        Sr, Uhr = Sr / scaling, Ur.t()
    return torch.diag(torch.sqrt(Sr)) @ Uhr, Vr @ torch.diag(torch.sqrt(Sr))


def _olora(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (R's first r rows, Q's first r columns) of W = Q R; PEFT's olora_init."""
    Q, R = torch.linalg.qr(w)
    return R[:r].contiguous(), Q[:, :r].contiguous()


@torch.no_grad()
def restore_base_weight(layer: nn.Module) -> None:
    """W = W_res + s B0 A0: the original base back (up to one rounding), for remove_lora."""
    weight = layer.base_layer.weight
    A0, B0 = (t.to(weight.device) for t in layer.initial_lora)
    w = weight.to(A0.dtype)
    w = w.T if layer.fan_in_fan_out else w
    restored = w + layer.scaling * B0 @ A0
    weight.copy_((restored.T if layer.fan_in_fan_out else restored).to(weight.dtype))
    del layer.initial_lora


def plain_lora_tensors(
    initial: dict[str, tuple[torch.Tensor, torch.Tensor]], state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """state with each A -> [A; A0] and B -> [B, -B0]: s B' A' = s (B A - B0 A0) on the original base.

    initial: (A0, B0) by the module name's saved key prefix (".lora_A.weight" and ".lora_B.weight" follow it).
    """
    plain = dict(state)
    for prefix, (A0, B0) in initial.items():
        A, B = state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"]
        plain[f"{prefix}.lora_A.weight"] = torch.cat([A, A0.to(A.device, A.dtype)], dim=0)
        plain[f"{prefix}.lora_B.weight"] = torch.cat([B, -B0.to(B.device, B.dtype)], dim=1)
    return plain


def plain_lora_config(config: LoraConfig) -> LoraConfig:
    """The converted adapter's config, as PEFT writes it: rank 2r, alpha doubled (rsLoRA: x sqrt 2), default init."""
    rank_pattern, alpha_pattern = config.rank_pattern, config.alpha_pattern
    if config.use_rslora and (rank_pattern or alpha_pattern):  # PEFT refuses it too: the per-layer scaling breaks
        raise ValueError("converting a PiSSA/OLoRA adapter with use_rslora and rank_pattern/alpha_pattern is not "
                         "supported (as in PEFT)")
    alpha = config.lora_alpha * (2**0.5 if config.use_rslora else 2)
    changes = {"r": 2 * config.r, "lora_alpha": alpha, "init_lora_weights": True}
    if rank_pattern:
        changes["rank_pattern"] = {key: 2 * value for key, value in rank_pattern.items()}
    if alpha_pattern:
        changes["alpha_pattern"] = {key: 2 * value for key, value in alpha_pattern.items()}
    return dataclasses.replace(config, **changes)
