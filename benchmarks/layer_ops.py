"""What one adapted layer's forward + backward runs and writes, counted op by op with a TorchDispatchMode.

    python -m benchmarks.layer_ops                      # Qwen2.5-0.5B's shapes, bf16 base, 8 x 1024 tokens
    python -m benchmarks.layer_ops --tokens 2048 --autocast

Counts, not times: which ops run, in which dtype, and how many bytes of activation-sized tensors (tokens x d_in
or tokens x d_out and up) they write carry over from CPU to CUDA, where each op is a kernel and each byte is
memory traffic. Views are neither. Rows: lora-rm's fast path, lora-rm's plain equation (`fast_path = False`,
PEFT's casts), and PEFT's own LoraLayer on the same base.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SHAPES = [(896, 896), (896, 4864), (4864, 896)]  # Qwen2.5-0.5B: q/o, gate/up, down


@dataclass
class Op:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    storage: int  # data_ptr of the storage, to tell a tensor from a view of it
    view: bool  # shares an input's storage without writing it: no kernel, no traffic


class OpLog(TorchDispatchMode):
    """Records every op's tensor outputs as they are dispatched (forward and, on CPU, backward too)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage().data_ptr()
                view = storage in inputs and not func._schema.is_mutable  # addmm_ writes into its input: not a view
                self.ops.append(Op(str(func.overloadpacket), t.dtype, tuple(t.shape), t.numel() * t.element_size(),
                                   storage, view))
        return out

    def kernels(self) -> int:
        """Ops that compute or copy (views excluded)."""
        return sum(not op.view for op in self.ops)

    def activation_ops(self, activation_numel: int) -> list[Op]:
        """The non-view outputs of activation size (numel >= activation_numel)."""
        return [op for op in self.ops if not op.view and op.nbytes and op_numel(op) >= activation_numel]


def op_numel(op: Op) -> int:
    return op.nbytes // torch.empty((), dtype=op.dtype).element_size()


def trace(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, autocast: bool = False):
    """Forward and backward of `layer` on a leaf copy of x: (x's leaf, y, the OpLog, the tensors saved for backward)."""
    x = x.detach().requires_grad_()
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    autocast_context = torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with OpLog() as log, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with autocast_context:
            y = layer(x)
        y.backward(grad)
    return x, y, log, saved


def saved_activation_bytes(saved: list[torch.Tensor], parameters: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages saved for backward, parameters (which exist anyway) excluded."""
    skip = {p.untyped_storage().data_ptr() for p in parameters}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(nbytes for ptr, nbytes in storages.items() if ptr not in skip)


def layers(d_in: int, d_out: int, r: int, dtype: torch.dtype) -> dict[str, nn.Module]:
    """lora-rm's layer (fast path on and off) and PEFT's, on copies of one frozen base, with the same A and B != 0."""
    import copy

    import peft

    from lora_rm import LoRALinear

    base = nn.Linear(d_in, d_out, dtype=dtype).requires_grad_(False)
    ours = LoRALinear(base, r, 2 * r, init_lora_weights=False)
    nn.init.normal_(ours.lora_B.weight, std=0.02)
    plain = copy.deepcopy(ours)
    plain.fast_path = False
    wrapper = nn.Module()
    wrapper.proj = copy.deepcopy(base)
    theirs = peft.get_peft_model(wrapper, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"])).base_model
    with torch.no_grad():
        theirs.model.proj.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.model.proj.lora_B["default"].weight.copy_(ours.lora_B.weight)
    return {"lora-rm fast path": ours, "lora-rm equation (fast_path=False)": plain, "PEFT": theirs.model.proj}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8 * 1024)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--autocast", action="store_true", help="fp32 base under bf16 autocast instead of a bf16 base")
    args = parser.parse_args()
    dtype = torch.float32 if args.autocast else torch.bfloat16
    print(f"{args.tokens} tokens, r={args.r}, {'fp32 base under bf16 autocast' if args.autocast else 'bf16 base'}; "
          f"torch {torch.__version__}, forward + backward of one layer\n")
    print("| shape | layer | kernels | activation MB written | fp32 activation tensors | saved for backward MB |")
    print("|---|---|---|---|---|---|")
    for d_in, d_out in SHAPES:
        x = torch.randn(args.tokens, d_in, dtype=dtype)
        for name, layer in layers(d_in, d_out, args.r, dtype).items():
            grad = torch.randn(args.tokens, d_out, dtype=torch.bfloat16)
            _, _, log, saved = trace(layer, x, grad, args.autocast)
            activations = log.activation_ops(args.tokens * min(d_in, d_out))
            written = sum(op.nbytes for op in activations) / 1e6
            fp32 = sum(op.dtype == torch.float32 for op in activations)
            saved_mb = saved_activation_bytes(saved, list(layer.parameters())) / 1e6
            print(f"| {d_in}->{d_out} | {name} | {log.kernels()} | {written:.0f} | {fp32} | {saved_mb:.0f} |")


if __name__ == "__main__":
    main()
