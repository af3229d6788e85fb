"""Launched by tests/test_distributed.py under torchrun: several `lora-rm train` runs in one process group.

argv[1] is a JSON list of steps: a list of CLI words is a `lora-rm train` run; {"preempt": [src, dst]} copies
run src to dst as if it had been stopped after its next-to-last checkpoint (rank 0 copies, everyone waits).
Sharing one launch keeps the test fast on 2 cores: starting Python + torch costs more than the runs.
"""

import json
import shutil
import sys
from pathlib import Path

from lora_rm import distributed
from lora_rm.checkpoint import list_checkpoints
from lora_rm.cli import build_parser, train_config_from_args
from lora_rm.train import train


def preempt_copy(source: str | Path, target: str | Path) -> None:
    """A copy of a finished run as it stood when its next-to-last checkpoint was written."""
    shutil.copytree(source, target)
    target = Path(target)
    shutil.rmtree(list_checkpoints(target / "checkpoints")[-1])
    for name in ("adapter_model.safetensors", "adapter_config.json", "eval_metrics.json", "reward_stats.json"):
        (target / name).unlink()


def main(steps: list) -> None:
    with distributed.process_group():
        for step in steps:
            if isinstance(step, dict):
                if distributed.is_main():
                    preempt_copy(*step["preempt"])
                distributed.barrier()
            else:
                train(train_config_from_args(build_parser().parse_args(["train", *step])))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
