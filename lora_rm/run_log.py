"""Where a run's log records go: log.jsonl always, and with --report-to tensorboard TensorBoard event files beside it.

`tensorboard --logdir runs/` then shows every run under its folder, live: the writer flushes after each record.
Tags: training keys as train/<key>; an eval key as <prefix>/<metric> with its log prefix ("eval", or
"eval_<name>" for each of several --eval-dataset), nested dicts flattened (eval/reward_stats/mean).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from . import distributed
from .run_folder import log_line

TENSORBOARD_EXTRA = "pip install 'lora-rm[tensorboard]'"


def summary_writer_class():
    """torch's SummaryWriter; an ImportError naming the extra when tensorboard is not installed."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it, and says less clearly what to install)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(f"--report-to tensorboard needs the tensorboard package: {TENSORBOARD_EXTRA}") from error
    return SummaryWriter


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
    """Append records to log.jsonl (rank 0) and, with report_to="tensorboard", to TensorBoard events beside it."""

    def __init__(self, path: Path, report_to: str = "none", eval_prefixes: tuple[str, ...] = ("eval",)) -> None:
        self.path = path
        self.eval_prefixes = eval_prefixes
        self.writer = None
        if report_to == "tensorboard" and distributed.is_main():
            self.writer = summary_writer_class()(log_dir=str(path.parent))

    def __call__(self, record: dict[str, Any]) -> None:
        log_line(self.path, record)
        if self.writer is not None:
            for tag, value in scalar_tags(record, self.eval_prefixes).items():
                self.writer.add_scalar(tag, value, global_step=record["step"])
            self.writer.flush()  # watched live: SummaryWriter would otherwise wait up to 120 s

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
