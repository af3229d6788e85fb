"""Launched under torchrun by tests/test_distributed.py: a `lora-rm train` run whose loss turns NaN on one rank only.

argv[1]: the rank whose loss turns NaN, argv[2]: from which micro-batch on (1-based), the rest: `lora-rm train` words.
Each rank prints how it stopped; a rank that stops with TrainingDiverged exits 3.
"""

import os
import sys

import lora_rm.train as train_module
from lora_rm import distributed
from lora_rm.cli import build_parser, train_config_from_args
from lora_rm.health import TrainingDiverged


def main(bad_rank: int, from_micro_batch: int, words: list[str]) -> None:
    rank = int(os.environ["RANK"])  # torchrun's; the process group opens inside train()
    with distributed.process_group():
        if rank == bad_rank:
            real_loss, calls = train_module.bradley_terry_loss, {"n": 0}

            def nan_loss(*args, **kwargs):
                calls["n"] += 1
                loss = real_loss(*args, **kwargs)
                return loss * float("nan") if calls["n"] >= from_micro_batch else loss

            train_module.bradley_terry_loss = nan_loss
        try:
            train_module.train(train_config_from_args(build_parser().parse_args(["train", *words])))
        except TrainingDiverged as error:
            print(f"rank {rank} stopped: {error}", flush=True)
            sys.exit(3)
    print(f"rank {rank} finished", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
