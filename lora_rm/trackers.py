"""Where a run's log records go besides log.jsonl: TensorBoard, Weights & Biases and MLflow (--report-to, several
at once, comma-separated).

Each tracker receives the numbers of every log.jsonl record at that record's step, under the tags
run_log.scalar_tags makes (train/loss, eval/accuracy, eval_<name>/reward_stats/mean, ...); W&B and MLflow also get
the run's settings (the TrainConfig; MLflow's params flatten the LoRA fields to lora.r, ...). Only rank 0 opens
any. A crash or a divergence stop closes each with close(failed=True): W&B then marks the run failed (exit code 1),
MLflow sets it FAILED; TensorBoard has no status and is just closed.

Each package is an optional extra, imported only when named, and the error for a missing one names the extra.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import time
from pathlib import Path
from typing import Any

from . import distributed
from .config import TrainConfig, report_targets

EXTRAS = {  # --report-to name: (module to import, what to install)
    "tensorboard": ("tensorboard", "pip install 'lora-rm[tensorboard]'"),
    "wandb": ("wandb", "pip install 'lora-rm[wandb]'"),
    "mlflow": ("mlflow", "pip install 'lora-rm[mlflow]'"),
}
PROJECT = "lora-rm"  # W&B project and MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say otherwise
MLFLOW_BATCH = {"params": 100, "metrics": 1000}  # MLflow's log_batch limits per call


def require(name: str) -> Any:
    """The tracker's package, imported; an ImportError naming the extra when it is not installed."""
    module, extra = EXTRAS[name]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"--report-to {name} needs the {module} package: {extra}") from error


def check_installed(report_to: str | list[str]) -> None:
    """Fail on a missing extra before the output folder or the model is touched."""
    for name in report_targets(report_to):
        if name == "tensorboard":
            summary_writer_class()  # torch.utils.tensorboard too
        else:
            require(name)


def summary_writer_class():
    """torch's SummaryWriter; an ImportError naming the extra when tensorboard is not installed."""
    require("tensorboard")  # torch.utils.tensorboard needs it, and says less clearly what to install
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


def flat_settings(config: TrainConfig) -> dict[str, str]:
    """The TrainConfig as text params, nested LoRA fields as lora.<field> (MLflow params are flat strings)."""
    flat = {}
    for name, value in dataclasses.asdict(config).items():
        items = value.items() if isinstance(value, dict) and name == "lora" else [(None, value)]
        for key, item in items:
            flat[f"{name}.{key}" if key else name] = str(item)
    return flat


class TensorBoard:
    """Event files beside log.jsonl, flushed at each record so that `tensorboard --logdir runs/` follows a run live."""

    def __init__(self, config: TrainConfig, folder: Path, start_step: int) -> None:
        # A resume from step N redoes the steps after N (and the step-0 evaluation of a run from --init-adapter):
        # drop their points, as run_log.truncate_log drops their lines.
        redone_from = 0 if start_step == 0 and config.init_adapter else start_step + 1
        purge_step = redone_from if config.resume else None
        self.writer = summary_writer_class()(log_dir=str(folder), purge_step=purge_step)

    def log(self, tags: dict[str, float], step: int) -> None:
        for tag, value in tags.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # SummaryWriter would otherwise wait up to 120 s

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandB:
    """A W&B run named after the output folder, its config the TrainConfig (WANDB_MODE, WANDB_DIR, ... as W&B reads
    them); a resumed run is a new W&B run, from the resumed step on."""

    def __init__(self, config: TrainConfig, folder: Path, start_step: int) -> None:
        wandb = require("wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=folder.name,
                              config=dataclasses.asdict(config))

    def log(self, tags: dict[str, float], step: int) -> None:
        self.run.log(tags, step=step)  # records of one step (training line, evaluation) join one history row

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MLflow:
    """An MLflow run named after the output folder, in MLFLOW_TRACKING_URI's store (else MLflow's default), its
    params the TrainConfig; a resumed run is a new MLflow run, from the resumed step on."""

    def __init__(self, config: TrainConfig, folder: Path, start_step: int) -> None:
        require("mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # no global active run: two runs in one process cannot mix
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=folder.name).info.run_id
        params = [Param(key, value) for key, value in flat_settings(config).items()]
        for start in range(0, len(params), MLFLOW_BATCH["params"]):
            self.client.log_batch(self.run_id, params=params[start : start + MLFLOW_BATCH["params"]])

    def log(self, tags: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow refuses keys with characters other than letters, digits, _ - . / and space (a subset's name may)
        metrics = [Metric(re.sub(r"[^\w\-./ ]", "_", tag), value, now, step) for tag, value in tags.items()]
        for start in range(0, len(metrics), MLFLOW_BATCH["metrics"]):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + MLFLOW_BATCH["metrics"]])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def open_trackers(config: TrainConfig, folder: Path, start_step: int = 0) -> list[TensorBoard | WandB | MLflow]:
    """The trackers config.report_to names, opened on rank 0 (none on the others); if one fails to open, those
    opened before it are closed as failed."""
    if not distributed.is_main():
        return []
    opened = []
    try:
        for name in report_targets(config.report_to):
            opened.append(TRACKERS[name](config, folder, start_step))
    except BaseException:
        for tracker in opened:
            tracker.close(failed=True)
        raise
    return opened
