"""Helpers that run training in tests: tiny runs, their logs, replay checks, crash injection and torchrun.

Shared by the test files as tests/parity.py is; no test file imports another.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora_rm.train as train_module
from lora_rm import load_adapter
from lora_rm.builtin import builtin_model, builtin_tokenizer
from lora_rm.cli import main as cli_main
from lora_rm.config import LoraConfig, TrainConfig


def tiny_run(output, **overrides) -> TrainConfig:
    """Six optimizer steps on the built-in task: fast, but with accumulation and dropout to replay exactly."""
    settings = dict(
        output=str(output), max_rows=120, eval_fraction=0.2, max_steps=6, batch_size=4, grad_accum=2,
        max_length=32, lr=1e-3, warmup_ratio=0.2, save_every=3, log_every=1, progress=False,
        lora=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"),
    )
    return TrainConfig(**{**settings, **overrides})


def write_jsonl(path: Path, rows: list[dict]) -> str:
    """rows as a JSON-lines data file; its path, as a --dataset flag takes it."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def stock_model_folder(folder: Path) -> None:
    """A plain one-label AutoModelForSequenceClassification folder (no adapter), its tokenizer saved plainly."""
    tokenizer = builtin_tokenizer()
    builtin_model(tokenizer, seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def read_log(output):
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def train_losses(output):
    return [r["loss"] for r in read_log(output) if "loss" in r]


def assert_replays(run, full_run):
    """Same logged losses, same final adapter as the uninterrupted run."""
    assert train_losses(run) == pytest.approx(train_losses(full_run), abs=1e-6)
    tokenizer = builtin_tokenizer()
    a = load_adapter(builtin_model(tokenizer), full_run).state_dict()
    b = load_adapter(builtin_model(tokenizer), run).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def crash_at_micro_batch(monkeypatch, n, module=train_module, name="bradley_terry_loss"):
    """Make the n-th call of module.name (the loss: once per micro-batch) raise KeyboardInterrupt; undo with the
    result."""
    real_loss, calls = getattr(module, name), {"n": 0}

    def crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(module, name, crash)
    return lambda: monkeypatch.setattr(module, name, real_loss)


TESTS = Path(__file__).parent


# Tiny and deterministic: lora_dropout 0 (the CLI default), 4 optimizer steps of 2 micro-batches, a checkpoint
# at step 2. --batch-size is per process: 2 x 4 pairs is the global batch of 1 x 8.
FLAGS = [
    "--max-rows", "96", "--grad-accum", "2", "--max-steps", "4", "--max-length", "32", "--lora-r", "4",
    "--lora-alpha", "8", "--log-every", "1", "--save-every", "2", "--no-progress",
]  # fmt: skip
ONE, TWO = ["--batch-size", "8"], ["--batch-size", "4"]

# Adam divides by sqrt(v), so last-bit differences in a gradient reach the weights amplified. 2 ranks sum in another
# order than 1 process (alone: <= 2e-6 abs, 1e-4 rel after the 4 steps), and LoRALinear folds a micro-batch
# into (W + s B A) x or not by its token count, so 4-pair and 8-pair micro-batches may round differently (measured:
# <= 2.5e-5 abs, 3.7e-4 rel). A real DDP fault (a missed all-reduce, a wrong shard) moves weights by ~lr = 2e-3
# and the losses, which must agree to 1e-6, far more.
SAME_RUN_ATOL, SAME_RUN_RTOL = 1e-4, 1e-3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_process(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m torch.distributed.run --nproc_per_node 2 ARGS` on CPU and return the finished process."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=TESTS.parent)


def torchrun(*args: str) -> str:
    """Run `python -m torch.distributed.run --nproc_per_node 2 ARGS` on CPU; its output, or fail showing it."""
    done = torchrun_process(*args)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout


def one_process(output: Path, *flags: str) -> None:
    """The oracle, in this process; one thread, like each torchrun worker (2 threads on a busy 2-core box crawl)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli_main(["train", "--output", str(output), *FLAGS, *ONE, *flags])
    finally:
        torch.set_num_threads(threads)


def losses(output: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (output / "log.jsonl").read_text().splitlines()) if "loss" in r]


def assert_same_run(a: Path, b: Path, atol: float = SAME_RUN_ATOL, rtol: float = SAME_RUN_RTOL) -> None:
    """Same logged losses and the same saved adapter, tensor by tensor (tolerances: see SAME_RUN_ATOL)."""
    assert losses(a) == pytest.approx(losses(b), abs=1e-6) and len(losses(a)) == 4
    adapter_a = assert_same_tensors(a / "adapter_model.safetensors", b / "adapter_model.safetensors", atol, rtol)
    # Not vacuous: B moved away from its zero init.
    assert max(t.abs().max().item() for k, t in adapter_a.items() if "lora_B" in k) > 1e-3


def assert_same_tensors(
    a: Path, b: Path, atol: float = SAME_RUN_ATOL, rtol: float = SAME_RUN_RTOL
) -> dict[str, torch.Tensor]:
    """Two safetensors files hold the same keys and close tensors; returns a's tensors."""
    tensors_a, tensors_b = load_file(a), load_file(b)
    assert tensors_a.keys() == tensors_b.keys()
    for key in tensors_a:
        torch.testing.assert_close(tensors_a[key], tensors_b[key], atol=atol, rtol=rtol, msg=key)
    return tensors_a
