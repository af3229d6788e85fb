"""Running under torchrun: PyTorch's own process group, DistributedDataParallel and collectives, nothing home-made.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them (or with WORLD_SIZE=1) every function here is a
no-op and the trainer is one plain process. Under DDP only the adapter and the head are communicated: the frozen
base is declared ignored, so it is neither broadcast when DDP is built nor all-reduced in backward.

Dropout streams (lora_dropout) are per rank: rank 0 keeps the seed's stream, rank r > 0 is re-seeded with
rank_seed(seed, r, 0). A checkpoint keeps every rank's RNG state; resuming under the same world size continues
each stream exactly, under another one rank r continues rank r's saved stream if the saved run had a rank r,
else it starts rank_seed(seed, r, step). Data order never depends on these streams (see data.batch_indices).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

RANK_PREFIX = "rank{}."  # RNG keys of rank r > 0 in a checkpoint's rng_state.safetensors; rank 0 keeps plain keys


def init_from_env(device: torch.device) -> tuple[int, int, torch.device]:
    """Join torchrun's process group once (gloo on CPU, NCCL on CUDA); returns (rank, world_size, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and not dist.is_initialized():
        return 0, 1, device
    if device.type == "cuda":  # one GPU per process: torchrun's LOCAL_RANK picks it
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a plain process): the one that logs, shows progress and writes files."""
    return rank() == 0


def print_main(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs)


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has finished writing a checkpoint); a no-op in one process."""
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Tear down the process group that init_from_env may open, also when training fails."""
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def wrap_ddp(model: nn.Module, device: torch.device, static_graph: bool = False) -> DistributedDataParallel:
    """DDP over the trainable parameters only (adapter + head); the frozen base is never sent.

    static_graph=True is what reentrant activation checkpointing needs: its recomputation runs a second,
    nested backward in which DDP's hooks would otherwise fire out of order (or once too often).
    """
    frozen = [name for name, param in model.named_parameters() if not param.requires_grad]
    # Buffers (rotary tables and the like) are constants, built the same on every rank: never synced either.
    buffers = [name for name, _ in model.named_buffers()]
    # DDP's documented workaround (pytorch#43690) to keep tensors out of its init broadcast, its buffer sync
    # and its reducer.
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen + buffers)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, static_graph=static_graph)


def communicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters DDP broadcasts at construction and all-reduces in backward."""
    ddp = model if isinstance(model, DistributedDataParallel) else None
    return [] if ddp is None else [p for p in ddp._module_parameters if p.requires_grad]


def no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync() unless sync: put it around the forward of every micro-batch but an accumulation's last.

    A static-graph DDP records its graph in its first backward, which must all-reduce: under no_sync it fails
    with "expect_autograd_hooks_ INTERNAL ASSERT FAILED" (torch 2.13), so that one micro-batch syncs anyway
    (averaging each micro-batch's grads over ranks and then summing them is the same sum).
    """
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    if model.static_graph and not getattr(model, "_static_graph_delay_allreduce_enqueued", False):
        return contextlib.nullcontext()  # the graph is not recorded yet
    return model.no_sync()  # the forward decides: DDP arms its all-reduce hooks there for the next backward


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(values: list[float]) -> list[float]:
    """Each number summed over all ranks (float64), e.g. loss sums and pair counts for exact means."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D tensor concatenated in rank order (lengths may differ), on every rank."""
    if not is_distributed():
        return tensor
    device, n = _comm_device(), world_size()
    local = tensor.detach().to(device).flatten()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(n)]
    dist.all_gather(sizes, torch.tensor([local.numel()], device=device))
    longest = max(int(size) for size in sizes)
    padded = torch.cat([local, local.new_zeros(longest - local.numel())])  # all_gather wants equal shapes
    pieces = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[: int(size)] for piece, size in zip(pieces, sizes, strict=True)]).to(tensor.device)


def shard(items: list) -> list:
    """This rank's contiguous share of items (gather_cat of the results restores the original order)."""
    r, n = rank(), world_size()
    return items[r * len(items) // n : (r + 1) * len(items) // n]


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The dropout seed of a rank that has no saved stream to continue."""
    return seed + 1_000_003 * rank + step


def gather_rng_states(states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's RNG states for the checkpoint: rank 0's under their own names, rank r's as 'rank{r}.name'."""
    if not is_distributed():
        return dict(states)
    gathered = dict(states)
    for name, state in sorted(states.items()):  # the same names, in the same order, on every rank
        pieces = [torch.empty_like(state, device=_comm_device()) for _ in range(world_size())]
        dist.all_gather(pieces, state.to(_comm_device()))
        for r, piece in enumerate(pieces[1:], start=1):
            gathered[RANK_PREFIX.format(r) + name] = piece.cpu()
    return gathered


def restore_rank_rng(saved: dict[str, torch.Tensor], seed: int, step: int) -> None:
    """After load_checkpoint restored rank 0's RNG on every rank: give rank r > 0 its own stream back."""
    r = rank()
    if r == 0:
        return
    prefix = RANK_PREFIX.format(r)
    own = {name[len(prefix) :]: state for name, state in saved.items() if name.startswith(prefix)}
    if "cpu" not in own:  # the saved run had fewer ranks
        torch.manual_seed(rank_seed(seed, r, step))
        return
    torch.set_rng_state(own["cpu"])
    cuda = [own[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in own]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
