"""Crash-safe training checkpoints without pickle: the format, written and read in this one file.

    OUTPUT/checkpoints/step-000120/
        adapter_model.safetensors, adapter_config.json   adapter and head, PEFT's format (adapter_io.py)
        optimizer.safetensors    AdamW's state as flat tensors "state.{param index}.{exp_avg|exp_avg_sq|step}"
        rng_state.safetensors    torch RNG states: rank 0's as "cpu", "cuda.0", ...; rank r's as "rank{r}.cpu", ...
        trainer_state.json       step (it fixes the position in the data), total_steps, world_size, global_batch,
                                 the optimizer's param groups and Python's RNG state

A checkpoint is written under a temporary name and renamed, so a crash mid-save leaves the previous one as the
latest. Under torchrun every rank takes part in a save (the gathers are collectives) and rank 0 writes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import distributed
from .adapter_io import adapter_state_dict, matched_adapter_tensors, read_adapter_weights, save_adapter
from .atomic import atomic_path
from .config import TrainConfig

CHECKPOINT_PATTERN = re.compile(r"step-(\d+)")
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng_state.safetensors"
RANK_PREFIX = "rank{}."  # RNG keys of rank r > 0; rank 0 keeps plain keys


def optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict (full tensors) into flat tensors and JSON-able param groups."""
    tensors = {
        f"state.{index}.{key}": (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu().contiguous()
        for index, param_state in state["state"].items()
        for key, value in param_state.items()
    }
    return tensors, {"param_groups": state["param_groups"]}


def load_optimizer_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: dict[str, Any]
) -> None:
    """Inverse of optimizer_tensors; under FSDP each rank keeps its shards of the full state."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    distributed.load_optimizer_state(model, optimizer, {"state": state, "param_groups": groups["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    """Torch RNG states (CPU and every CUDA device): dropout depends on them."""
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    return tensors


def gather_rng_states() -> dict[str, torch.Tensor]:
    """Every rank's RNG states for the checkpoint: rank 0's under their own names, rank r's as 'rank{r}.name'."""
    states = rng_tensors()
    gathered = dict(states)
    for name, state in sorted(states.items()):  # the same names, in the same order, on every rank
        for r, piece in enumerate(distributed.all_gather(state)[1:], start=1):
            gathered[RANK_PREFIX.format(r) + name] = piece
    return gathered


def restore_rng(saved: dict[str, torch.Tensor], python_state: list, seed: int, step: int) -> None:
    """Give this rank its saved RNG streams back; a rank the saved run did not have starts rank_seed's stream."""
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    rank = distributed.rank()
    prefix = RANK_PREFIX.format(rank)
    if rank == 0:
        own = {name: state for name, state in saved.items() if not name.startswith("rank")}
    else:
        own = {name[len(prefix) :]: state for name, state in saved.items() if name.startswith(prefix)}
    if "cpu" not in own:
        torch.manual_seed(distributed.rank_seed(seed, rank, step))
        return
    torch.set_rng_state(own["cpu"])
    cuda_states = [own[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in own]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)


def save_checkpoint(
    folder: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Call on every rank: gather adapter, optimizer and RNG states, rank 0 writes step-N; returns its path."""
    rng = gather_rng_states()
    adapter = distributed.full_tensors(adapter_state_dict(model))  # collectives under FSDP
    optimizer_state = distributed.full_optimizer_state(model, optimizer)
    final = Path(folder) / f"step-{step:06d}"
    bad = [key for key, tensor in adapter.items() if not torch.isfinite(tensor).all()]
    if bad:  # every rank holds the full tensors, so every rank refuses
        raise ValueError(
            f"not writing checkpoint {final.name}: {len(bad)} adapter/head tensors hold NaN or inf "
            f"(first: {bad[0]}); the checkpoints already in {folder} are untouched"
        )
    if distributed.is_main():
        write_checkpoint(final, model, adapter, optimizer_state, rng, {**trainer_state, "step": step})
        # The new one is unverified until a later step's loss from its weights is checked; the one before it is
        # verified (its next steps passed health.check): never prune that, or a divergence leaves none good.
        for old in list_checkpoints(folder)[:-max(keep, 2)]:
            shutil.rmtree(old)
    distributed.barrier()  # nobody goes on (or resumes) before the checkpoint is complete
    return final


def write_checkpoint(
    final: Path,
    model: nn.Module,
    adapter: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    rng: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
) -> None:
    """Write the checkpoint's files into a temporary folder beside `final`, then rename it to `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, state=adapter, convert_to_plain=False)  # as trained: resume loads it onto W_res
    tensors, groups = optimizer_tensors(optimizer_state)
    for name, part in ((OPTIMIZER_NAME, tensors), (RNG_NAME, rng)):
        with atomic_path(tmp / name) as path:  # for the umask's mode (safetensors writes 0600)
            save_file(part, path)
    state = {**trainer_state, "optimizer": groups, "python_rng": list(random.getstate())}
    (tmp / STATE_NAME).write_text(json.dumps(state, indent=2))
    if final.exists():  # a re-run of the same step after a resume: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of a crashed save are ignored)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.fullmatch(p.name).group(1)))


@torch.no_grad()
def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 0
) -> dict[str, Any]:
    """Restore adapter, head, optimizer and this rank's RNG from a checkpoint; returns its trainer state (step too).

    seed: the run's seed, for a rank the saved run did not have (resuming under a larger world size).
    """
    path = Path(path)
    # Read and check every file before changing anything: a corrupt checkpoint leaves model and optimizer as they were.
    state_path = path / STATE_NAME
    try:
        state = json.loads(state_path.read_text())
        step, groups, python_rng = state["step"], state["optimizer"], state["python_rng"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"checkpoint file {state_path} is missing or corrupt: {error!r}") from error
    weights = read_adapter_weights(path)
    targets = matched_adapter_tensors(model, weights)
    saved_optimizer, saved_rng = (read_tensors(path / name) for name in (OPTIMIZER_NAME, RNG_NAME))
    for key, target in targets.items():
        target.copy_(distributed.shard_like(weights[key], target))  # FSDP: this rank's shard
    load_optimizer_tensors(model, optimizer, saved_optimizer, groups)
    restore_rng(saved_rng, python_rng, seed, step)
    return state


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """load_file, naming the file when it is missing or corrupt (e.g. cut short by a kill)."""
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"checkpoint file {path} is missing or corrupt: {error}") from error


def set_aside_checkpoints(folder: str | os.PathLike, from_step: int) -> list[Path]:
    """Rename checkpoints of step >= from_step to 'diverged-step-N' so no resume picks them; returns the new paths."""
    moved = []
    for path in list_checkpoints(folder):
        if int(CHECKPOINT_PATTERN.fullmatch(path.name).group(1)) >= from_step:
            target = path.with_name(f"diverged-{path.name}")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
            moved.append(target)
    return moved


def resume_from_latest_checkpoint(
    config: TrainConfig, model: nn.Module, optimizer, checkpoints: Path, global_batch: int
) -> int:
    """With resume, load the latest loadable checkpoint on every rank (DDP replicates it); the step to start at.

    A corrupt checkpoint (e.g. a file cut short) is named and the one before it tried; nothing is deleted.
    """
    saved = list_checkpoints(checkpoints) if config.resume else []
    if not saved:
        return 0
    problems = []
    for path in reversed(saved):
        try:
            state = load_checkpoint(path, model, optimizer, config.seed)
            break
        except ValueError as error:  # load_checkpoint reads every file before it changes anything
            problems.append(f"{path.name}: {error}")
            distributed.print_main(f"warning: cannot resume from {path.name}: {error}")
    else:
        raise ValueError(f"--resume: no checkpoint in {checkpoints} can be loaded ({'; '.join(problems)})")
    fallback = f" ({path.name}: the later checkpoint could not be loaded, see above)" if problems else ""
    distributed.print_main(f"resumed from step {state['step']}{fallback}")
    if state.get("global_batch", global_batch) != global_batch:
        raise ValueError(
            f"--resume: the saved run took {state['global_batch']} pairs per step, this one {global_batch}; the "
            "data position and schedule would not replay it (keep batch_size x processes x grad_accum)"
        )
    return state["step"]
