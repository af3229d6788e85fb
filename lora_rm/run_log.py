"""Everything about a run's log.jsonl: the window each line averages, appending, truncating on resume, reading;
each record's numbers also go to the --report-to trackers (trackers.py) as tags.

Tags: training keys as train/<key>; an eval key as <prefix>/<metric> with its log prefix ("eval", or
"eval_<name>" for each of several --eval-dataset), nested dicts flattened (eval/reward_stats/mean).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .atomic import atomic_path
from .loss import preference_metrics


def scalar_tags(record: dict[str, Any], eval_prefixes: tuple[str, ...]) -> dict[str, float]:
    """The record's numbers as TensorBoard tags (bools, None and text left out), without its step."""
    tags = {}

    def add(tag: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                add(f"{tag}/{key}", item)
        elif type(value) in (int, float):  # type(): bools are ints
            tags[tag] = float(value)

    for key, value in record.items():
        if key == "step":
            continue
        prefix = next((p for p in sorted(eval_prefixes, key=len, reverse=True) if key.startswith(p + "_")), None)
        add(f"{prefix}/{key[len(prefix) + 1:]}" if prefix else f"train/{key}", value)
    return tags


class RunLog:
    """Append records to log.jsonl (rank 0) and hand their numbers to the trackers; a context manager that closes
    them as failed when the run ends with an error (a crash, a divergence stop)."""

    def __init__(self, path: Path, eval_prefixes: tuple[str, ...] = ("eval",), trackers: list | tuple = ()) -> None:
        self.path = path
        self.eval_prefixes = eval_prefixes
        self.trackers = list(trackers)  # trackers.open_trackers: empty on ranks > 0

    def __call__(self, record: dict[str, Any]) -> None:
        log_line(self.path, record)
        if self.trackers:
            tags = scalar_tags(record, self.eval_prefixes)
            for tracker in self.trackers:
                tracker.log(tags, record["step"])

    def close(self, failed: bool = False) -> None:
        """Close every tracker once (a second call does nothing)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(failed)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failed=kind is not None)


def read_log(path: str | os.PathLike) -> list[dict]:
    """The JSON records of a log.jsonl; a partial last line (a run still writing) is skipped with a warning."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{number} is not JSON; skipped", stacklevel=2)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def log_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON record to log.jsonl (rank 0 only)."""
    if distributed.is_main():
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def truncate_log(path: Path, step: int, total_steps: int) -> None:
    """Drop the log records a resume from `step` writes again: later steps, and the final eval of a finished run.

    A torn last line (a kill mid-write) is dropped with a note; a bad line before it is an error naming it.
    """
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_step, is_eval = record["step"], any(key.startswith("eval_") for key in record)
        except (json.JSONDecodeError, TypeError, KeyError) as error:
            if number == len(lines):
                distributed.print_main(f"note: dropping the torn last line {number} of {path} (cut off mid-write)")
                continue
            raise ValueError(f"cannot resume: {path}:{number} is not a log record ({error!r})") from error
        # evaluated again by this run: at the end, or at step 0 (a run from --init-adapter evaluates where it starts)
        final_eval = is_eval and record_step == step and step in (0, total_steps)
        if record_step <= step and not final_eval:
            kept.append(line)
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in kept))


@dataclass
class LogWindow:
    """Losses and rewards since the last log line: each line averages its window, as HF Trainer's logged loss."""

    losses: list[torch.Tensor] = field(default_factory=list)  # 0-dim, on the device: read once per line
    chosen: list[torch.Tensor] = field(default_factory=list)
    rejected: list[torch.Tensor] = field(default_factory=list)
    pairs_seen: int = 0  # since this process started, for pairs/s
    start: int = 0  # the step the window opened after: a resumed run's first window is shorter

    def add(self, loss: torch.Tensor, rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> None:
        self.losses.append(loss.detach())
        self.chosen.append(rewards_chosen)
        self.rejected.append(rewards_rejected)
        self.pairs_seen += len(rewards_chosen)

    def record(self, step: int, steps_per_epoch: int, grad_norm: torch.Tensor | float, lr: float,
               elapsed: float) -> dict:
        """The log line over every rank's window (collectives), then an empty window."""
        chosen, rejected = (distributed.gather_cat(torch.cat(r)) for r in (self.chosen, self.rejected))
        metrics = preference_metrics(chosen, rejected)
        totals = [torch.stack(self.losses).double().sum().item(), len(self.losses), self.pairs_seen]
        loss_sum, n_losses, all_pairs = distributed.sum_over_ranks(totals)
        self.losses, self.chosen, self.rejected = [], [], []
        window_steps, self.start = step - self.start, step
        return {
            "step": step,
            "epoch": round(step / steps_per_epoch, 4),
            "loss": loss_sum / n_losses,
            "window_steps": window_steps,  # optimizer steps the loss averages (fewer after a resume)
            "accuracy": metrics["accuracy"],
            "margin": metrics["mean_margin"],
            "grad_norm": float(grad_norm),
            "lr": lr,
            "pairs_per_s": all_pairs / elapsed,
        }
