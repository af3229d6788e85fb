"""Where one adapted layer's step spends its time: the top kernels (CUDA) or ops (CPU) by torch.profiler.

One bf16 nn.Linear (bias-free, as Qwen2's projections), a LoRA adapter on it as each library builds it (lora-rm's
LoRALinear; PEFT through get_peft_model, which keeps the adapter in fp32 as on a whole model), and a step that
runs the forward under bf16 autocast and the backward to x and the adapter, as the overhead suite's train step
does layer by layer. "base" is the same step on the bare layer: the floor of the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

IMPLS = ("base", "lora-rm", "peft")


@dataclass(frozen=True)
class Kernel:
    """One kernel (or CPU op) of the profiled steps, per step."""

    name: str
    ms: float
    calls: float


class OneLayer(nn.Module):
    """A module holding one projection, so PEFT can target it by name."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def one_layer(impl: str, d_in: int, d_out: int, rank: int, device: str) -> nn.Module:
    """The bf16 layer, bare or with each library's adapter (B != 0, so no product is trivially zero)."""
    torch.manual_seed(0)
    model = OneLayer(d_in, d_out).to(device=device, dtype=torch.bfloat16).requires_grad_(False)
    if impl == "lora-rm":
        from lora_rm.lora import LoRALinear

        model.proj = LoRALinear(model.proj, r=rank, lora_alpha=2 * rank)
    elif impl == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.02)
    return model


def top_kernels(impl: str, d_in: int, d_out: int, tokens: int, rank: int, device: str, top: int,
                steps: int = 5) -> tuple[list[Kernel], float]:
    """The `top` kernels by device time per step (CPU: ops by self CPU time), and the total per step in ms."""
    from torch.profiler import ProfilerActivity, profile

    model = one_layer(impl, d_in, d_out, rank, device)
    x = torch.randn(tokens, d_in, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, d_out, device=device, dtype=torch.bfloat16)
    cuda = device == "cuda"

    def step() -> None:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            y = model(x)
        y.backward(grad.to(y.dtype))

    for _ in range(3):  # warm-up: cuBLAS picks its algorithms, autograd builds its caches
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    if cuda:  # kernels only: CPU-side ops of the same names would count twice
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        times = {e.key: (e.self_device_time_total, e.count) for e in events}
    else:  # leaf-ish ops: self time, so a parent op does not count its children again
        times = {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}
    kernels = [Kernel(name, us / 1000 / steps, count / steps) for name, (us, count) in times.items() if us > 0]
    kernels.sort(key=lambda kernel: kernel.ms, reverse=True)
    return kernels[:top], sum(kernel.ms for kernel in kernels)
