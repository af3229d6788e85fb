"""The training loop: learning-rate schedule, exact resume, NaN stop, output safety, only adapter+head move."""

import json
import os
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from runs import assert_replays, crash_at_micro_batch, read_log, tiny_run, train_losses, write_jsonl
from torch.overrides import TorchFunctionMode

import lora_rm.train as train_module
from lora_rm import load_adapter
from lora_rm.builtin import builtin_model, builtin_ranking_dataset, builtin_tokenizer
from lora_rm.checkpoint import list_checkpoints
from lora_rm.config import LoraConfig
from lora_rm.health import TrainingDiverged
from lora_rm.optim import learning_rate
from lora_rm.train import train


def test_learning_rate_schedule_matches_transformers():
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    param = torch.nn.Parameter(torch.zeros(1))
    for schedule, make in (("linear", get_linear_schedule_with_warmup), ("cosine", get_cosine_schedule_with_warmup)):
        optimizer = torch.optim.SGD([param], lr=0.1)
        reference = make(optimizer, num_warmup_steps=3, num_training_steps=20)
        for step in range(20):
            assert learning_rate(step, 20, 3, 0.1, schedule) == pytest.approx(optimizer.param_groups[0]["lr"])
            optimizer.step()
            reference.step()


@pytest.mark.slow
def test_resume_replays_the_uninterrupted_run(tmp_path, monkeypatch):
    full = tmp_path / "full"
    train(tiny_run(full))

    interrupted = tmp_path / "interrupted"
    undo = crash_at_micro_batch(monkeypatch, 9)  # step 5 of 6 (two micro-batches a step)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(interrupted))
    undo()
    assert [p.name for p in list_checkpoints(interrupted / "checkpoints")] == ["step-000003"]
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_run(interrupted))
    train(tiny_run(interrupted, resume=True))

    assert len(train_losses(full)) == 6
    assert_replays(interrupted, full)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss = train_module.bradley_terry_loss
    calls = {"n": 0}

    def nan_at_step_five(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 9 else loss

    monkeypatch.setattr(train_module, "bradley_terry_loss", nan_at_step_five)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 5"):
        train(tiny_run(tmp_path))
    checkpoints = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-000003"]
    loaded = load_adapter(builtin_model(builtin_tokenizer()), checkpoints[-1])
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_output_holding_a_run_is_refused_unless_overwrite(tmp_path):
    train(tiny_run(tmp_path, max_steps=1, lora=LoraConfig(r=2, target_modules=["q_proj"])))
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(tiny_run(tmp_path, max_steps=1))
    train(tiny_run(tmp_path, max_steps=1, overwrite=True))
    assert len(train_losses(tmp_path)) == 1


def test_run_writes_peft_adapter_stats_and_keeps_last_checkpoints(tmp_path):
    metrics = train(tiny_run(tmp_path, save_every=1, keep_checkpoints=2, eval_every=2))
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
    stats = json.loads((tmp_path / "reward_stats.json").read_text())
    assert set(stats) == {"mean", "std"} and stats["std"] > 0
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000005", "step-000006"]
    evals = [r for r in read_log(tmp_path) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert metrics["n_pairs"] == 22 and 0 <= metrics["accuracy"] <= 1  # 2 of the 24 held out are training rows


class HostReads(TorchFunctionMode):
    """Counts reads of a tensor back to the host made by lora-rm's own code; on a GPU each one waits until the
    device has run everything queued before it. Reads inside torch.optim (AdamW's step counters, CPU tensors even on a
    GPU) and inside transformers are not lora-rm's; the test's docstring names the one transformers makes. A
    collator's reads (collate_*) are of tensors it builds on the host, before data.to_device: they wait on nothing."""

    READS = (torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
             torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
             # ops whose output's size depends on the values: the host waits for them to learn it
             torch.Tensor.nonzero, torch.nonzero, torch.Tensor.masked_select, torch.masked_select)

    @staticmethod
    def is_boolean_mask_index(func, args) -> bool:
        """x[mask] with a bool tensor: a nonzero() inside, sized by the values."""
        if func is not torch.Tensor.__getitem__:
            return False
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)

    @staticmethod
    def is_waiting_copy(func, args, kwargs) -> bool:
        """x.to(device) or torch.tensor(..., device=d) without non_blocking: on CUDA a copy from pageable host memory
        synchronizes the stream (a read's wait, the other way). data.to_device pins and copies without waiting, so
        every move onto the device goes through it; on CPU the move is a no-op, but the call is still seen here."""
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            devices = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (torch.device, str))]
            return bool(devices) and not kwargs.get("non_blocking", False)
        return func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None

    def __init__(self) -> None:
        super().__init__()
        self.places: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        stack = traceback.extract_stack()[:-1]
        lora_rm_itself = f"{os.sep}lora_rm{os.sep}" in stack[-1].filename  # torch's own moves are torch's business
        read = func in self.READS or self.is_boolean_mask_index(func, args) or (
            lora_rm_itself and self.is_waiting_copy(func, args, kwargs))
        read = read and not any(frame.name.startswith("collate_") or frame.name == "to_device" for frame in stack)
        if read and f"{os.sep}torch{os.sep}optim{os.sep}" not in stack[-1].filename:
            caller = next(frame for frame in reversed(stack) if f"{os.sep}torch{os.sep}" not in frame.filename)
            if f"{os.sep}lora_rm{os.sep}" in caller.filename:
                self.places.append(f"{func.__name__} at {Path(caller.filename).name}:{caller.lineno}")
        return func(*args, **(kwargs or {}))


STEP_ROWS = ["pairs padded", "pairs packed", "K-way all_pairs", "K-way plackett_luce"]


def steady_run(tmp_path, rows: str, **overrides):
    """tiny_run of 6 steps that log and save only at the end, on `rows` (one of STEP_ROWS)."""
    options = dict(packing="auto" if rows == "pairs packed" else "none")
    if rows.startswith("K-way"):
        k_way = builtin_ranking_dataset(120, k=3)
        options.update(dataset=write_jsonl(tmp_path / "rows.jsonl", list(k_way)), ranking_loss=rows.split()[1])
    return tiny_run(tmp_path / "run", max_steps=6, log_every=100, save_every=None, **options, **overrides)


def after_each_step(monkeypatch, note) -> None:
    """Call note() after every optimizer step of train()."""
    real_step = train_module.optimizer_step

    def noting_step(*args, **kwargs):
        real_step(*args, **kwargs)
        note()

    monkeypatch.setattr(train_module, "optimizer_step", noting_step)


@pytest.mark.parametrize("rows", STEP_ROWS)
def test_a_steady_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch, rows):
    """Between two optimizer steps that neither log nor save, lora-rm's loop reads no tensor back to the host:
    health flags, the loss and the gradient norm stay on the device until a step logs or saves (issue 22 allows
    one; none is made). transformers itself reads whether a padded batch has padding once per forward
    (masking_utils' fast_all: not lora-rm's, so not counted); packed rows, with their own 4D mask, skip that too.
    K-way rows bring their pairs and their number of rows from the collator (the losses used to read the row count
    and run nonzero() on the device: 3 to 5 reads per micro-batch); packed rows go to the device through
    data.to_device (5 waiting copies per packed run before)."""
    reads, per_step = HostReads(), []

    def note() -> None:
        per_step.append(list(reads.places))
        reads.places.clear()

    after_each_step(monkeypatch, note)
    with reads:
        train(steady_run(tmp_path, rows))
    steady = per_step[1:-1]  # the first step starts the epoch (its shuffle); the last logs and saves
    assert len(steady) == 4
    assert steady == [[]] * 4, steady
    assert per_step[-1], "the last step logs: its health flags are read then"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", ["pairs padded", "pairs packed", "K-way all_pairs"])
def test_a_steady_cuda_step_never_waits_for_the_gpu(tmp_path, monkeypatch, rows):
    """The same on a GPU, by torch's own detector (set_sync_debug_mode warns at every synchronizing call, whoever
    makes it): packed rows never wait; padded rows at most once per micro-batch (2 here), in transformers' padding
    check."""
    allowed = 0 if rows == "pairs packed" else 2
    marks: list[int] = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            after_each_step(monkeypatch, lambda: marks.append(len(caught)))
            train(steady_run(tmp_path, rows, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")

    def syncs_in(first: int, last: int) -> list[str]:  # other warnings (a deprecation, say) are not waits
        return [str(w.message)[:160] for w in caught[first:last] if "synchronizing" in str(w.message)]

    syncs = [len(syncs_in(a, b)) for a, b in zip(marks, marks[1:], strict=False)][:-1]  # steps 2 to 5, as above
    assert len(syncs) == 4
    assert all(n <= allowed for n in syncs), (syncs, syncs_in(marks[0], marks[-2]))


def test_a_step_larger_than_the_training_data_is_refused(tmp_path):
    """--epochs 1 used to make one step of 3.4 passes over the data, logged as "epoch 1.0"."""
    with pytest.raises(ValueError, match=r"one optimizer step takes 32 pairs \(batch_size 4 x grad_accum 8 x 1 "
                                         r"processes\) but the training data holds 16 pairs"):
        train(tiny_run(tmp_path, max_rows=20, batch_size=4, grad_accum=8, max_steps=None, epochs=1.0))
    assert not (tmp_path / "checkpoints").exists()
