"""Crash-safe training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder OUTPUT/checkpoints/step-000120/ holding the adapter (PEFT format), the optimizer
and scheduler position, the RNG states and the step (which fixes the position in the data). It is written
under a temporary name and renamed, so a crash mid-save leaves the previous checkpoint as the latest.
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
from safetensors.torch import load_file, save_file
from torch import nn

from . import distributed
from .adapter_io import load_adapter_weights, read_adapter_weights, save_adapter

CHECKPOINT_PATTERN = re.compile(r"step-(\d+)")
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng_state.safetensors"


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, state: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split optimizer.state_dict() (or `state`, one with full tensors) into flat tensors and JSON-able groups."""
    state = optimizer.state_dict() if state is None else state
    tensors = {
        f"state.{index}.{key}": (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu().contiguous()
        for index, param_state in state["state"].items()
        for key, value in param_state.items()
    }
    return tensors, {"param_groups": state["param_groups"]}


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    groups: dict[str, Any],
    model: nn.Module | None = None,
) -> None:
    """Inverse of optimizer_tensors; pass the model when it may be FSDP-sharded (each rank keeps its shards)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    full = {"state": state, "param_groups": groups["param_groups"]}
    if model is None:
        optimizer.load_state_dict(full)
    else:
        distributed.load_optimizer_state(model, optimizer, full)


def rng_tensors() -> dict[str, torch.Tensor]:
    """Torch RNG states (CPU and every CUDA device): dropout and data order depend on them."""
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    return tensors


def restore_rng(saved: dict[str, torch.Tensor], python_state: list, seed: int, step: int) -> None:
    """Give this rank its saved RNG streams back; a rank the saved run did not have starts rank_seed's stream."""
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    own = distributed.rank_rng_states(saved)
    if "cpu" not in own:
        torch.manual_seed(distributed.rank_seed(seed, distributed.rank(), step))
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
    rng: dict[str, torch.Tensor] | None = None,
    adapter: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoints/step-N atomically (temporary folder, then os.replace) and keep the last `keep`.

    rng: the RNG states to keep (under torchrun, every rank's from distributed.gather_rng_states); default this
    process's. adapter, optimizer_state: already gathered full tensors (under FSDP, from distributed.full_tensors
    and distributed.full_optimizer_state); default the model's and the optimizer's own.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, state=adapter)
    tensors, groups = optimizer_tensors(optimizer, optimizer_state)
    save_file(tensors, tmp / OPTIMIZER_NAME)
    save_file(rng if rng is not None else rng_tensors(), tmp / RNG_NAME)
    state = {**trainer_state, "step": step, "optimizer": groups, "python_rng": list(random.getstate())}
    (tmp / STATE_NAME).write_text(json.dumps(state, indent=2))
    if final.exists():  # a re-run of the same step after a resume: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of a crashed save are ignored)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.fullmatch(p.name).group(1)))


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 0
) -> dict[str, Any]:
    """Restore adapter, head, optimizer and this rank's RNG from a checkpoint; returns its trainer state (step too).

    seed: the run's seed, for a rank the saved run did not have (resuming under a larger world size).
    """
    path = Path(path)
    state_path = path / STATE_NAME
    try:
        state = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"checkpoint {path} is incomplete or corrupt ({STATE_NAME}): {error}") from error
    load_adapter_weights(model, read_adapter_weights(path))
    load_optimizer_tensors(optimizer, load_file(path / OPTIMIZER_NAME), state["optimizer"], model)
    restore_rng(load_file(path / RNG_NAME), state["python_rng"], seed, state["step"])
    return state
