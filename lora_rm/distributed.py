"""Running under torchrun: PyTorch's own process group, DistributedDataParallel and collectives, nothing home-made.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them (or with WORLD_SIZE=1) every function here is a
no-op and the trainer is one plain process. Under DDP only the adapter and the head are communicated: the frozen
base is declared ignored, so it is neither broadcast when DDP is built nor all-reduced in backward.

Dropout streams (lora_dropout) are per rank: rank 0 keeps the seed's stream, rank r > 0 is re-seeded with
rank_seed(seed, r, 0). A checkpoint keeps every rank's RNG state; resuming under the same world size continues
each stream exactly, under another one rank r continues rank r's saved stream if the saved run had a rank r,
else it starts rank_seed(seed, r, step). Data order never depends on these streams (see data.batch_indices).

Under FSDP (fully_shard, for a model that does not fit one device) every parameter is a DTensor shard: each
decoder layer is one unit, the root holds the rest. Saving gathers full tensors on every rank (collectives),
rank 0 writes them; resuming cuts every rank's shard out of the full tensors it read, without communication.
A checkpoint base is never loaded whole under FSDP: sharded_load.py builds it on the meta device and fills the shards.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from transformers.modeling_layers import GradientCheckpointingLayer


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


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The dropout seed of a rank that has no saved stream to continue."""
    return seed + 1_000_003 * rank + step

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


def synchronized_seconds(started: float) -> float:
    """Seconds since `started` (time.perf_counter) once this device has finished the work queued so far."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - started


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


def wrap_model(model: nn.Module, device: torch.device, fsdp: bool, static_graph: bool) -> nn.Module:
    """The module the training forward runs through: model itself, sharded in place by FSDP, or a DDP wrapper.

    Outside torchrun this moves the model to the device and returns it. static_graph: see wrap_ddp.
    """
    if not is_distributed():
        if fsdp:
            print("fsdp: one process, nothing to shard; training unsharded")
        return model.to(device)
    if fsdp:  # fully_shard moves each unit to the device as it shards it: the model need not fit one device
        n_layers = wrap_fsdp(model, device)
        print_main(f"FSDP over {world_size()} processes: {n_layers} decoder layers + the root sharded")
        return model
    wrapped = wrap_ddp(model.to(device), device, static_graph)
    n_sent = sum(p.numel() for p in communicated_parameters(wrapped))
    print_main(f"DDP over {world_size()} processes: {n_sent:,} adapter + head parameters all-reduced")
    return wrapped


def unwrapped(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper, where hooks and attributes live; any other module (FSDP's too) itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


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
    if not isinstance(model, DistributedDataParallel):
        return []
    return [p for p in model.module.parameters() if p.requires_grad]


def no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync() unless sync: put it around the forward of every micro-batch but an accumulation's last.

    A static-graph DDP records its graph in its first backward, which must all-reduce: under no_sync it fails
    with "expect_autograd_hooks_ INTERNAL ASSERT FAILED" (torch 2.13), so that one micro-batch syncs anyway
    (averaging each micro-batch's grads over ranks and then summing them is the same sum).

    Under FSDP it sets set_requires_gradient_sync(sync) and leaves it set: FSDP reads the flag in backward, after
    this context has closed, and every micro-batch sets it afresh.
    """
    if is_fsdp(model):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
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


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of an equally shaped tensor, in rank order, on the CPU; [tensor] in one process."""
    if not is_distributed():
        return [tensor]
    pieces = [torch.empty_like(tensor, device=_comm_device()) for _ in range(world_size())]
    dist.all_gather(pieces, tensor.to(_comm_device()))
    return [piece.cpu() for piece in pieces]


def shard(items: list) -> list:
    """This rank's contiguous share of items (gather_cat of the results restores the original order)."""
    r, n = rank(), world_size()
    return items[r * len(items) // n : (r + 1) * len(items) // n]


def equal_shard(items: list) -> tuple[list, int]:
    """This rank's share padded with copies of items[0] to the longest share's length, and how many are real.

    Under FSDP every rank must run the same number of forwards (each all-gathers the weights), so shares of 4 and
    5 pairs both run 5; the caller drops the padding's results before gather_cat.
    """
    mine = shard(items)
    longest = -(-len(items) // world_size())
    return mine + items[:1] * (longest - len(mine)), len(mine)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: transformers' GradientCheckpointingLayer instances, else the `layers`/`h`/`layer` list."""
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    if layers:
        return layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rpartition(".")[2] in ("layers", "h", "layer"):
            return list(module)
    return []


def wrap_fsdp(model: nn.Module, device: torch.device) -> int:
    """fully_shard each decoder layer, then the root (in place); returns how many layers became their own unit.

    The model may still be on the CPU: fully_shard moves each unit to the device as it shards it, so the full
    model never has to fit one device. Frozen base, adapter and head share the units; only the trainable shards
    get gradients, which FSDP reduce-scatters (averaged over ranks, as DDP's all-reduce).
    """
    mesh = init_device_mesh(device.type, (world_size(),))
    layers = decoder_layers(model)
    for layer in reversed(layers):  # innermost first, should blocks ever nest
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(layers)


def is_fsdp(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank: a DTensor is all-gathered (a collective: every rank must call it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """full_tensor of every value, in the dict's order (the same on every rank), e.g. of adapter_state_dict(model)."""
    return {name: full_tensor(tensor) for name, tensor in state.items()}


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of full, laid out as the DTensor `like` (full itself when like is a plain tensor).

    No communication: every rank read the same full tensor from disk and cuts its own shard out of it.
    """
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def local_rows(like: torch.Tensor) -> slice | None:
    """The dim-0 rows of the full tensor that this rank holds of `like`: all of a plain tensor; None when `like`
    is sharded otherwise than FSDP2's Shard(0) on one mesh dimension (then cut with shard_like).

    Shard(0) splits as torch.chunk does: ceil(n / ranks) rows per rank, the last ranks' shorter or empty.
    """
    if not isinstance(like, DTensor):
        return slice(None)
    if tuple(like.placements) != (Shard(0),) or like.device_mesh.ndim != 1:
        return None
    rows, ranks = like.shape[0], like.device_mesh.size()
    start = min(rows, like.device_mesh.get_local_rank() * -(-rows // ranks))
    return slice(start, start + like.to_local().shape[0])


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in the order optimizer.state_dict() numbers them."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with full tensors, numbered as usual; under FSDP a collective, complete on rank 0 only.

    FSDP goes through PyTorch's get_optimizer_state_dict (full_state_dict, offloaded to the CPU on rank 0), which
    keys parameters by name; they are numbered back so the checkpoint is the same under DDP, FSDP or one process.
    """
    if not is_fsdp(model):
        return optimizer.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_optimizer_state_dict(model, optimizer, options=options)
    if not full:  # ranks > 0
        return {}
    index = {name: i for i, name in enumerate(_optimizer_names(model, optimizer))}
    return {
        "state": {index[name]: state for name, state in full["state"].items()},
        "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in full["param_groups"]],
    }


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of full_optimizer_state: every rank passes the same full state; under FSDP each keeps its shards."""
    if not is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    names = _optimizer_names(model, optimizer)
    by_name = {
        "state": {names[index]: param_state for index, param_state in state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
