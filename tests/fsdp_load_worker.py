"""Launched by tests/test_distributed.py: train's model set-up on a checkpoint folder, measured.

argv[1] is a folder for the results, argv[2:] the `lora-rm train` words (with --fsdp and --model FOLDER). Each rank
writes rank{r}.json with its peak RSS growth (MB) while train's set-up (load_base, prepare_model) loaded the model
and every local weight was read once, and the tensor elements it read from the checkpoint files;
rank 0 writes the (gathered) weights to weights.safetensors. Run as one plain process it is the oracle
(from_pretrained); under torchrun, FSDP's sharded load. It never trains: the test trains in a launch of its own.
"""

import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import lora_rm.sharded_load as sharded_load
from lora_rm import distributed
from lora_rm.cli import build_parser, train_config_from_args
from lora_rm.train import load_base, prepare_model


def status_mb(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM), in MB."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


READ = {"elements": 0}  # tensor elements this rank read from the checkpoint through sharded_load


class CountingReads:
    """safe_open as sharded_load uses it (keys, get_slice, then indexing), counting the elements each read returns."""

    def __init__(self, *args, **kwargs):
        self.opened = real_safe_open(*args, **kwargs)

    def __enter__(self):
        self.handle = self.opened.__enter__()
        return self

    def __exit__(self, *exc):
        return self.opened.__exit__(*exc)

    def keys(self):
        return self.handle.keys()

    def get_slice(self, key):
        return CountingSlice(self.handle.get_slice(key))


class CountingSlice:
    def __init__(self, stored):
        self.stored = stored

    def get_shape(self):
        return self.stored.get_shape()

    def __getitem__(self, index):
        tensor = self.stored[index]
        READ["elements"] += tensor.numel()
        return tensor


real_safe_open = sharded_load.safe_open
sharded_load.safe_open = CountingReads


def main(results: Path, words: list[str]) -> None:
    config = train_config_from_args(build_parser().parse_args(["train", *words]))
    with distributed.process_group():
        rank, _, device = distributed.init_from_env(torch.device("cpu"))
        torch.manual_seed(config.seed)  # as train() seeds before loading
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = status_mb("VmRSS")
        model, _ = load_base(config, device)
        prepare_model(model, config, device)
        for param in model.parameters():  # read every local weight once, as the first forward does: from_pretrained
            param.to_local().sum() if distributed.is_fsdp(model) else param.sum()  # maps the file, pages come lazily
        growth = status_mb("VmHWM") - before
        measured = {"peak_rss_growth_mb": growth, "elements_read": READ["elements"]}
        (results / f"rank{rank}.json").write_text(json.dumps(measured))
        full = distributed.full_tensors(model.state_dict())  # a collective
        if rank == 0:
            save_file({key: tensor.contiguous() for key, tensor in full.items()}, results / "weights.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
