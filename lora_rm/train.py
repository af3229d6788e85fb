"""The Bradley-Terry training loop, written out: set-up, then one flat loop over optimizer steps.

Each step: set the learning rate, run grad_accum micro-batches (chosen and rejected of a batch in ONE
forward pass), clip, step, zero the grads, log; evaluate and checkpoint on intervals. The step number
alone fixes the position in the data (batch order is a pure function of seed and epoch), so a resumed
run replays exactly what an uninterrupted one would have done.

Under torchrun the same loop runs on every rank; process-group work stays inside distributed.py and
checkpoint.py (wrapping the model, syncing gradients, gathering logs and checkpoints).

Run safety: OUTPUT/.lock keeps a second run out of the folder; a resume refuses changed settings (but those in
RESUME_MAY_CHANGE); a loss, gradient or weight that is not finite, or a model collapsed to constant rewards, stops
the run and names the latest checkpoint that is still good.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import random
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import data, distributed, sharded_load
from .adapter_io import _atomic_path, adapter_state_dict, save_adapter
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, set_aside_checkpoints
from .config import TrainConfig
from .inject import add_lora, enable_gradient_checkpointing, format_parameter_counts, lora_config_of
from .loss import bradley_terry_loss, preference_metrics
from .scoring import (
    autocast_context,
    eval_metrics,
    load_model_and_tokenizer,
    pair_collator,
    pair_rewards,
    rewards_for_pairs,
    save_tokenizer,
)

MIN_EVAL_PAIRS = 20  # an automatic eval split smaller than this gets a warning: its accuracy moves in steps of 5%+
LOCK_NAME = ".lock"  # in the output folder while a run writes there: {"pid", "host", "started"}
CONFIG_NAME = "train_config.json"
COLLAPSE_STEPS = 5  # this many consecutive optimizer steps with constant rewards or a zero gradient norm: collapsed

# What a resume may change, each on purpose; any other changed setting is refused (it would not be what ran).
RESUME_MAY_CHANGE = {
    "max_steps": "extends (or shortens) the run; the schedule follows the new total from here on",
    "epochs": "the same, counted in passes over the data",
    "resume": "how this process was started, not what it trains",
    "overwrite": "the same (a resume never overwrites)",
    "output": "the same run, reached by another path or copied to another folder",
    "progress": "display only",
    "log_every": "how often the loss is logged, not what is trained",
    "eval_every": "when to evaluate, not what is trained",
    "save_every": "when to checkpoint, not what is trained",
    "keep_checkpoints": "disk use only",
    "device": "where it runs (another node or GPU); the math is the same",
    "batch_size": "the per-process share, to resume under another number of processes; resume_step refuses a "
                  "changed global batch (batch_size x processes x grad_accum)",
    "grad_accum": "the same",
    "gradient_checkpointing": "trades memory for compute; the gradients are the same",
    "reentrant_checkpointing": "the same",
    "allow_pickle_weights": "how the base's weights may be read, not which weights",
}


class TrainingDiverged(RuntimeError):
    """A loss, gradient or weight became NaN or inf, or the model collapsed; only good checkpoints are kept."""


def lock_holder(lock: Path) -> dict[str, Any] | None:
    """The {pid, host, started} a run wrote into its lock; None when the file is unreadable."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) and {"pid", "host", "started"} <= set(holder) else None


def holder_is_gone(holder: dict[str, Any]) -> bool:
    """True only when the holder ran on this host and its pid is no live process (or is this very process)."""
    if holder["host"] != socket.gethostname():
        return False  # another node's process cannot be asked
    if holder["pid"] == os.getpid():
        return True  # a container restarted after a kill -9 gets the same pid; this process holds no lock yet
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False  # PermissionError: alive, another user's
    return False


def take_output_lock(output: Path) -> Path:
    """Create OUTPUT/.lock for this process (O_EXCL: exactly one run wins); a dead holder's lock is taken over."""
    output.mkdir(parents=True, exist_ok=True)
    lock = output / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    for attempt in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = lock_holder(lock)
            if attempt == 0 and holder is not None and holder_is_gone(holder):
                print(f"taking over the stale lock {lock}: pid {holder['pid']} on {holder['host']} (started "
                      f"{holder['started']}) is no longer running")
                lock.unlink(missing_ok=True)
                continue
            if holder is None:
                raise FileExistsError(
                    f"{output} is locked by {lock}, which is unreadable; if no run writes to this folder, delete it"
                ) from None
            raise FileExistsError(
                f"{output} is in use by another run: pid {holder['pid']} on host {holder['host']}, started "
                f"{holder['started']}; wait for it to finish (if it is gone, delete {lock})"
            ) from None
        with os.fdopen(handle, "w") as file:
            file.write(json.dumps(me) + "\n")
        return lock
    raise FileExistsError(f"{lock} was taken by another run while this one took over its stale lock")


def release_output_lock(lock: Path) -> None:
    """Remove the lock if it is still this process's (never another run's)."""
    holder = lock_holder(lock)
    if holder is not None and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold OUTPUT/.lock for the whole run; rank 0 takes it, and every rank stops if it could not."""
    lock, error = None, None
    if distributed.is_main():
        try:
            lock = take_output_lock(output)
        except FileExistsError as caught:
            error = caught
    if distributed.sum_over_ranks([float(error is not None)])[0]:  # a collective: every rank learns the outcome
        raise error or FileExistsError(f"{output} is in use by another run (see rank 0's message)")
    try:
        yield
    finally:
        if lock is not None:
            release_output_lock(lock)


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, schedule: str) -> float:
    """transformers' linear/cosine schedule with linear warmup, as a pure function of the step."""
    if step < warmup_steps:
        return peak * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * max(0.0, 1.0 - progress)


def load_pairs(config: TrainConfig, tokenizer) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Tokenized (train, eval) pairs; without an eval dataset, the last eval_fraction of the training rows."""
    train_data = data.load_preference_dataset(config.dataset, config.split, config.max_rows, config.rows, config.seed)
    if config.eval_dataset is not None:
        eval_data = data.load_preference_dataset(
            config.eval_dataset, config.eval_split, config.max_eval_rows, config.eval_rows
        )
    else:
        n_eval = max(1, int(len(train_data) * config.eval_fraction))
        n_train = len(train_data) - n_eval
        train_data, eval_data = train_data.select(range(n_train)), train_data.select(range(n_train, len(train_data)))
    train_pairs = tokenize(train_data, tokenizer, config, "train")
    eval_pairs = tokenize(eval_data, tokenizer, config, "eval")
    if config.eval_dataset is None and len(eval_pairs) < MIN_EVAL_PAIRS:
        distributed.print_main(
            f"warning: the automatic eval split holds only {len(eval_pairs)} pairs (eval_fraction="
            f"{config.eval_fraction} of {len(train_data) + len(eval_data)} rows): its accuracy is noise; raise "
            "--eval-fraction or pass --eval-dataset"
        )
    return train_pairs, eval_pairs


def tokenize(dataset, tokenizer, config: TrainConfig, name: str) -> list[dict[str, Any]]:
    """Tokenized pairs as plain dicts, with what the length policy and bad-row skipping did printed."""
    pairs, stats = data.tokenize_pairs(
        dataset, tokenizer, config.max_length, config.length_policy, config.skip_bad_rows
    )
    distributed.print_main(f"{name} pairs: {stats}")
    if not len(pairs):
        raise ValueError(f"no {name} pairs left after tokenization ({stats}); raise --max-length or check the data")
    return pairs.to_list()


def prepare_output(config: TrainConfig) -> Path:
    """Refuse to mix a new run into an old one unless told to resume or overwrite; rank 0 alone touches disk."""
    output = Path(config.output)
    has_run = output.is_dir() and any(
        (output / name).exists() for name in ("log.jsonl", "adapter_config.json", "checkpoints")
    )
    if has_run and not (config.resume or config.overwrite):
        raise FileExistsError(f"{output} already holds a run; pass --resume to continue it or --overwrite")
    distributed.barrier()  # every rank has looked before rank 0 deletes anything
    if has_run and config.overwrite and distributed.is_main():
        for entry in output.iterdir():
            if entry.name != LOCK_NAME:  # the lock stays: this run holds it
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    if distributed.is_main():
        output.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    if config.resume:
        check_resumed_config(config, output / CONFIG_NAME)
    return output


def changed_settings(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(name, old, new) of every setting both hold with different values; nested dicts (lora) as 'lora.r'."""
    changes = []
    for name in now:
        if name not in saved:
            continue  # a setting this version added: the saved run had its default
        if isinstance(now[name], dict) and isinstance(saved[name], dict):
            changes += changed_settings(saved[name], now[name], f"{prefix}{name}.")
        elif now[name] != saved[name]:
            changes.append((f"{prefix}{name}", saved[name], now[name]))
    return changes


def check_resumed_config(config: TrainConfig, saved_path: Path) -> None:
    """Refuse to resume with settings other than the saved run's, but those RESUME_MAY_CHANGE allows."""
    if not saved_path.exists():
        return
    try:
        saved = json.loads(saved_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot resume: {saved_path} is not valid JSON ({error})") from error
    now = json.loads(json.dumps(dataclasses.asdict(config)))  # as it would be saved: tuples as lists
    refused = [change for change in changed_settings(saved, now) if change[0] not in RESUME_MAY_CHANGE]
    if refused:
        listed = ", ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in refused)
        raise ValueError(
            f"--resume with changed settings ({listed}); the checkpoints were trained with the old values in "
            f"{saved_path}. Resume with those, or start a new run (another --output, or --overwrite). A resume "
            f"may change only: {', '.join(RESUME_MAY_CHANGE)}"
        )


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout of the base to p=0, as TRL's RewardTrainer does by default (disable_dropout=True)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def prepare_model(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """Dropout off (TRL's default), LoRA in, checkpointing on, then DDP/FSDP; returns what the forward runs through.

    `model` stays the plain module (sharded in place under FSDP) for evaluation and saving.
    """
    if config.disable_dropout:
        disable_dropout(model)
    add_lora(model, config.lora)
    model.train()
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model, use_reentrant=config.reentrant_checkpointing)
    distributed.print_main(format_parameter_counts(model))
    reentrant = config.gradient_checkpointing and config.reentrant_checkpointing
    forward_model = distributed.wrap_model(model, device, config.fsdp, static_graph=reentrant)
    if sharded_load.is_empty(model):  # built by load_base on the meta device: read this rank's shards now
        sharded_load.load_shards(model, config.model, device, config.base_dtype)
    return forward_model


def load_base(config: TrainConfig, device: torch.device):
    """(model, tokenizer); under --fsdp across processes the model is still empty (meta): prepare_model fills it."""
    if sharded_load.applies(config):
        return sharded_load.empty_model_and_tokenizer(config.model, config.trust_remote_code, config.base_dtype)
    return load_model_and_tokenizer(
        config.model, config.trust_remote_code, config.base_dtype, config.load_in_4bit, config.bnb_4bit_compute_dtype,
        device, config.allow_pickle_weights,
    )


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over adapter and head only; the head may have its own learning rate."""
    head_names = tuple(f"{name}." for name in lora_config_of(model).modules_to_save)
    head, adapter = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if name.startswith(head_names) else adapter).append(param)
    groups = [{"params": adapter, "lr": config.lr, "peak_lr": config.lr}]
    head_lr = config.head_lr or config.lr
    groups.append({"params": head, "lr": head_lr, "peak_lr": head_lr})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def resume_step(config: TrainConfig, model: nn.Module, optimizer, checkpoints: Path, global_batch: int) -> int:
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


def micro_batch_loss(forward_model: nn.Module, batch: dict[str, torch.Tensor], config: TrainConfig, device,
                     sync: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen and rejected in one forward, then the fp32 Bradley-Terry loss: (loss, rewards_chosen, rewards_rejected).

    sync=False on every micro-batch but an accumulation's last: DDP all-reduces the gradients once per step.
    """
    batch = {key: tensor.to(device) for key, tensor in batch.items()}
    with distributed.no_sync(forward_model, sync), autocast_context(config.precision, device):
        rewards_chosen, rewards_rejected = pair_rewards(forward_model, batch)
    loss = bradley_terry_loss(rewards_chosen, rewards_rejected, batch.get("margin"), config.center_rewards_coefficient)
    return loss, rewards_chosen.detach(), rewards_rejected.detach()


def clip_gradients(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, max_grad_norm: float) -> float:
    """Unscale and clip the global gradient norm; returns the norm before clipping (the same on every rank)."""
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    return distributed.full_tensor(grad_norm).item()  # a DTensor under FSDP


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Step (fp16's scaler skips a step with inf/NaN gradients) and zero the grads."""
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def weights_are_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every trainable weight (adapter and head) is finite on every rank; the same answer on each."""
    local = [p.to_local() if hasattr(p, "to_local") else p for g in optimizer.param_groups for p in g["params"]]
    finite = torch.stack([t.detach().isfinite().all() for t in local]).all().item()
    return distributed.sum_over_ranks([float(not finite)])[0] == 0


def reward_spread(rewards: list[torch.Tensor]) -> float:
    """max - min of a step's rewards, summed over ranks: 0 only when each rank gave every text the same reward."""
    every = torch.cat(rewards).float()
    return distributed.sum_over_ranks([(every.max() - every.min()).item()])[0]


def diverged(what: str, lr: float, config: TrainConfig, checkpoints: Path, bad_from: int) -> TrainingDiverged:
    """The error that stops a run: what happened, the learning rate that did it, and the latest good checkpoint.

    Checkpoints of step >= bad_from hold the weights that went wrong: they are renamed diverged-step-N (kept to
    look at, never resumed from).
    """
    moved = set_aside_checkpoints(checkpoints, bad_from) if distributed.is_main() else []
    good = list_checkpoints(checkpoints)
    parts = [f"{what}; the learning rate of the update that led here was {lr:g} (peak --lr {config.lr:g})."]
    if moved:
        parts.append(f"Set aside as not good (saved with those weights): {', '.join(p.name for p in moved)}.")
    parts.append(f"The latest good checkpoint is {good[-1]}." if good else "There is no good checkpoint.")
    parts.append("Lower --lr, use fp32/bf16, or check the data.")
    return TrainingDiverged(" ".join(parts))


@dataclass
class LogWindow:
    """Losses and rewards since the last log line: each line averages its window, as HF Trainer's logged loss."""

    losses: list[float] = field(default_factory=list)
    chosen: list[torch.Tensor] = field(default_factory=list)
    rejected: list[torch.Tensor] = field(default_factory=list)
    pairs_seen: int = 0  # since this process started, for pairs/s
    start: int = 0  # the step the window opened after: a resumed run's first window is shorter

    def add(self, loss: torch.Tensor, rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> None:
        self.losses.append(loss.item())
        self.chosen.append(rewards_chosen)
        self.rejected.append(rewards_rejected)
        self.pairs_seen += len(rewards_chosen)

    def record(self, step: int, steps_per_epoch: int, grad_norm: float, lr: float, elapsed: float) -> dict:
        """The log line over every rank's window (collectives), then an empty window."""
        chosen, rejected = (distributed.gather_cat(torch.cat(r)) for r in (self.chosen, self.rejected))
        metrics = preference_metrics(chosen, rejected)
        totals = [sum(self.losses), len(self.losses), self.pairs_seen]
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
            "grad_norm": grad_norm,
            "lr": lr,
            "pairs_per_s": all_pairs / elapsed,
        }


def evaluate(model, pairs, collator, batch_size: int, device, precision: str = "fp32") -> dict[str, Any]:
    """Metrics over every eval pair (rewards concatenated first, so the means are exact, not batch means).

    Under torchrun each rank scores its contiguous shard and the rewards are gathered in order before the means.
    Shards are padded to equal length and the padding's rewards dropped: under FSDP every forward is a collective.
    """
    mine, n_real = distributed.equal_shard(pairs)
    chosen, rejected = rewards_for_pairs(model, mine, collator, batch_size, device, precision)
    return eval_metrics(distributed.gather_cat(chosen[:n_real]), distributed.gather_cat(rejected[:n_real]))


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
        final_eval = is_eval and record_step == step == total_steps  # evaluated again at the end of this run
        if record_step <= step and not final_eval:
            kept.append(line)
    with _atomic_path(path) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in kept))


def train(config: TrainConfig) -> dict[str, Any]:
    """Train a LoRA reward model as configured, holding OUTPUT/.lock throughout; returns the final eval metrics."""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world_size, device = distributed.init_from_env(device)  # (0, 1, device) outside torchrun
    with output_lock(Path(config.output)):
        return train_locked(config, rank, world_size, device)


def train_locked(config: TrainConfig, rank: int, world_size: int, device: torch.device) -> dict[str, Any]:
    """train() once the output folder is this run's."""
    # -- set-up: output folder, seed, model, data, optimizer
    output = prepare_output(config)
    checkpoints, log_path = output / "checkpoints", output / "log.jsonl"
    random.seed(config.seed)
    torch.manual_seed(config.seed)  # the same on every rank: identical adapter init
    model, tokenizer = load_base(config, device)
    train_pairs, eval_pairs = load_pairs(config, tokenizer)
    collator = pair_collator(tokenizer)
    forward_model = prepare_model(model, config, device)
    if rank > 0:  # its own dropout stream; rank 0 goes on with the seed's
        torch.manual_seed(distributed.rank_seed(config.seed, rank, 0))
    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")

    # -- how long: batches of this rank per epoch (a pure function of seed and epoch), steps, intervals
    epoch_batches = functools.lru_cache(maxsize=1)(functools.partial(
        data.batch_indices, [pair["length"] for pair in train_pairs], config.batch_size, config.seed,
        group_by_length=config.group_by_length, rank=rank, world_size=world_size,
    ))
    n_batches = len(epoch_batches(epoch=0))
    steps_per_epoch = max(1, n_batches // config.grad_accum)
    total_steps = config.max_steps or max(1, int(config.epochs * steps_per_epoch))
    warmup_steps = int(config.warmup_ratio * total_steps)
    global_batch = config.batch_size * world_size * config.grad_accum
    trainer_state = {"total_steps": total_steps, "world_size": world_size, "global_batch": global_batch}

    start_step = resume_step(config, model, optimizer, checkpoints, global_batch)
    if distributed.is_main():
        truncate_log(log_path, start_step, total_steps)
        with _atomic_path(output / CONFIG_NAME) as tmp:  # after check_resumed_config: the settings that run
            Path(tmp).write_text(json.dumps(dataclasses.asdict(config), indent=2))

    # -- the loop
    window, started = LogWindow(start=start_step), time.perf_counter()
    previous_lr = learning_rate(max(0, start_step - 1), total_steps, warmup_steps, config.lr, config.lr_schedule)
    collapsed_since, collapse_lr = None, 0.0  # the step a run of collapsed steps began at, and the lr before it
    progress = tqdm(total=total_steps, initial=start_step, disable=not config.progress or rank > 0, desc="train")
    for step in range(start_step, total_steps):
        for group in optimizer.param_groups:  # adapter and head, each from its own peak
            group["lr"] = learning_rate(step, total_steps, warmup_steps, group["peak_lr"], config.lr_schedule)
        lr = optimizer.param_groups[0]["lr"]

        # grad_accum micro-batches; their mean gradient makes one step
        step_rewards = []
        for micro in range(step * config.grad_accum, (step + 1) * config.grad_accum):
            epoch, position = divmod(micro, n_batches)
            batch = collator([train_pairs[i] for i in epoch_batches(epoch=epoch)[position]])
            last = (micro + 1) % config.grad_accum == 0
            loss, rewards_chosen, rewards_rejected = micro_batch_loss(forward_model, batch, config, device, last)
            if not torch.isfinite(loss):  # the weights after `step` updates (checkpoint step-N, N = step) did this
                raise diverged(f"loss is {loss.item()} at step {step}; nothing was updated with it", previous_lr,
                               config, checkpoints, bad_from=step)
            scaler.scale(loss / config.grad_accum).backward()
            window.add(loss, rewards_chosen, rewards_rejected)
            step_rewards += [rewards_chosen, rewards_rejected]

        # the update, and the checks that stop a run gone wrong before it is logged or saved
        grad_norm = clip_gradients(optimizer, scaler, config.max_grad_norm)
        if not math.isfinite(grad_norm) and not scaler.is_enabled():  # fp16's scaler skips such a step itself
            raise diverged(f"the gradient norm is {grad_norm} at step {step}; nothing was updated with it",
                           previous_lr, config, checkpoints, bad_from=step)
        collapsed = grad_norm == 0.0 or reward_spread(step_rewards) == 0.0
        if not collapsed:
            collapsed_since = None
        elif collapsed_since is None:
            collapsed_since, collapse_lr = step, previous_lr  # the update before this step made these weights
        if collapsed_since is not None and step - collapsed_since + 1 >= COLLAPSE_STEPS:
            raise diverged(
                f"the model collapsed: every reward the same or a zero gradient norm for {COLLAPSE_STEPS} "
                f"consecutive steps ({collapsed_since}-{step}), so training cannot move it", collapse_lr, config,
                checkpoints, bad_from=collapsed_since,
            )
        try:
            optimizer_step(optimizer, scaler)
        except RuntimeError as error:  # AdamW's step size lr / (1 - beta1^t) overflows float32 at a huge lr
            if "overflow" not in str(error):
                raise
            raise diverged(f"the update of step {step} overflowed ({error})", lr, config, checkpoints,
                           bad_from=step + 1) from error
        if not weights_are_finite(optimizer):
            raise diverged(f"the update of step {step} left NaN or inf in the adapter or head", lr, config,
                           checkpoints, bad_from=step + 1)
        previous_lr = lr
        progress.update(1)

        # log, evaluate, checkpoint on their intervals
        done = step + 1
        if done % config.log_every == 0 or done == total_steps:
            record = window.record(done, steps_per_epoch, grad_norm, lr, time.perf_counter() - started)
            log_line(log_path, record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}")
        if config.eval_every and done % config.eval_every == 0 and done < total_steps:  # the final one follows
            interim = evaluate(model, eval_pairs, collator, config.batch_size, device, config.precision)
            log_line(log_path, {"step": done, **{f"eval_{k}": v for k, v in interim.items()}})
            progress.write(f"step {done}: eval accuracy {interim['accuracy']:.4f}")
        if (config.save_every and done % config.save_every == 0) or done == total_steps:
            save_checkpoint(checkpoints, done, model, optimizer, trainer_state, config.keep_checkpoints)
    progress.close()

    # -- the end: adapter and tokenizer, final evaluation
    adapter = distributed.full_tensors(adapter_state_dict(model))  # under FSDP every rank gathers, rank 0 writes
    if distributed.is_main():
        save_adapter(model, output, state=adapter)
        save_tokenizer(tokenizer, output)  # plain tokenizer(text) appends the EOS training did
    final = evaluate(model, eval_pairs, collator, config.batch_size, device, config.precision)
    log_line(log_path, {"step": total_steps, **{f"eval_{k}": v for k, v in final.items()}})
    if distributed.is_main():
        (output / "reward_stats.json").write_text(json.dumps(final["reward_stats"], indent=2))
        (output / "eval_metrics.json").write_text(json.dumps(final, indent=2))
    distributed.barrier()
    final["train_seconds"] = time.perf_counter() - started
    all_pairs = distributed.sum_over_ranks([window.pairs_seen])[0]
    final["train_pairs_per_s"] = all_pairs / final["train_seconds"] if all_pairs else 0.0
    return final
