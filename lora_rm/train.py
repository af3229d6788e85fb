"""The Bradley-Terry training loop, written out: set-up, then one flat loop over optimizer steps.

Each step: set the learning rate, run grad_accum micro-batches (chosen and rejected of a batch in ONE
forward pass), clip, step, zero the grads, log; evaluate and checkpoint on intervals. The step number
alone fixes the position in the data (batch order is a pure function of seed and epoch), so a resumed
run replays exactly what an uninterrupted one would have done.

Under torchrun the same loop runs on every rank; process-group work goes through distributed.py's functions
(wrapping the model, syncing gradients, gathering logs and checkpoints).

Run safety lives beside it: run_folder.py keeps a second run out of the output folder and a resume to the settings
that ran; health.py stops a run whose loss, gradients or weights are not finite, or whose model collapsed.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import data, distributed, packing, ranking, sharded_load
from .adapter_io import adapter_state_dict, save_adapter
from .checkpoint import resume_from_latest_checkpoint, save_checkpoint
from .config import TrainConfig
from .evaluate import evaluate, sequence_rewards
from .health import Health
from .inject import enable_gradient_checkpointing, format_parameter_counts
from .loss import bradley_terry_loss, ranking_loss, split_rewards
from .model_card import write_adapter_card
from .model_io import autocast_context, default_device, load_model_and_tokenizer, save_tokenizer
from .optim import build_optimizer, clip_gradients, learning_rate, optimizer_step, warmup_steps_for
from .run_folder import output_lock, prepare_output, write_config, write_final_metrics
from .run_log import LogWindow, RunLog, truncate_log
from .trackers import check_installed, open_trackers
from .warm_start import add_lora_from_init, record_init


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout of the base to p=0, as TRL's RewardTrainer does by default (disable_dropout=True)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def prepare_model(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """Dropout off (TRL's default), LoRA in (from --init-adapter's), checkpointing on, then DDP/FSDP; returns what
    the forward runs through.

    `model` stays the plain module (sharded in place under FSDP) for evaluation and saving.
    """
    if config.disable_dropout:
        disable_dropout(model)
    add_lora_from_init(model, config)
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


def fit_to_budget(pairs: list[dict[str, Any]], mode: str, config: TrainConfig, name: str) -> list[dict[str, Any]]:
    """Pairs that pack within --max-tokens-per-batch, the others dropped or cut by the length policy (printed)."""
    kept, changed = packing.fit_pairs_to_budget(pairs, mode, config.max_tokens_per_batch, config.length_policy)
    if changed:
        distributed.print_main(f"{name} pairs over --max-tokens-per-batch {config.max_tokens_per_batch}: {changed} "
                               f"({config.length_policy})")
    if not kept:
        raise ValueError(f"no {name} pairs fit --max-tokens-per-batch {config.max_tokens_per_batch}; raise it")
    return kept


def check_positions(model: nn.Module, sets: list[list[dict[str, Any]]]) -> None:
    """Refuse a side longer than the model's position table before training: learned positions (GPT-2, BERT, OPT)
    would fail mid-run with an IndexError."""
    positions = getattr(model.config, "max_position_embeddings", None)
    longest = max(row["length"] for rows in sets for row in rows)
    if positions and longest > positions:
        raise ValueError(f"the longest kept side has {longest} tokens, over the model's max_position_embeddings "
                         f"({positions}); lower --max-length to {positions} or less")


@dataclass
class Run:
    """What the loop reads, built once by set_up: model, data, optimizer and the run's length."""

    config: TrainConfig
    device: torch.device
    output: Path
    model: nn.Module  # the plain module (sharded in place under FSDP): evaluation and saving
    forward_model: nn.Module  # what the training forward runs through (model, or its DDP wrapper)
    tokenizer: Any
    train_pairs: list[dict[str, Any]]  # pairs or K-way rows, tokenized
    eval_sets: dict[str, list[dict[str, Any]]]  # log prefix -> eval pairs
    packing_mode: str  # resolved: none, padding_free or shared_prompt
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16 only; a no-op otherwise
    epoch_batches: Callable[[int], list[list[int]]]  # this rank's batches of an epoch (a pure function of seed, epoch)
    n_batches: int = 0  # this rank's batches per epoch
    total_steps: int = 0
    warmup_steps: int = 0
    start_step: int = 0  # > 0 when resumed
    trainer_state: dict[str, Any] | None = None  # saved in every checkpoint

    @property
    def checkpoints(self) -> Path:
        return self.output / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.output / "log.jsonl"

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n_batches // self.config.grad_accum)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return data.collate_rows(rows, self.tokenizer.pad_token_id)  # pairs or K-way rows

    def batch_rows(self, micro: int) -> list[dict[str, Any]]:
        """The rows of the run's micro-batch number `micro`: epoch and position follow from it alone."""
        epoch, position = divmod(micro, self.n_batches)
        return [self.train_pairs[i] for i in self.epoch_batches(epoch)[position]]

    def evaluate(self, step: int, log: RunLog) -> dict[str, dict[str, Any]]:
        """Every eval set's metrics at `step`, each logged under its prefix."""
        packed = dict(packing=self.packing_mode, max_tokens_per_batch=self.config.max_tokens_per_batch,
                      pad_token_id=self.tokenizer.pad_token_id)
        results = {}
        for prefix, pairs in self.eval_sets.items():
            results[prefix] = evaluate(self.model, pairs, self.collate, self.config.batch_size, self.device,
                                       self.config.precision, **packed)
            log({"step": step, **{f"{prefix}_{k}": v for k, v in results[prefix].items()}})
        return results


def train(config: TrainConfig) -> dict[str, Any]:
    """Train a LoRA reward model as configured, holding OUTPUT/.lock throughout; returns the final eval metrics."""
    device = torch.device(default_device(config.device))
    rank, world_size, device = distributed.init_from_env(device)  # (0, 1, device) outside torchrun
    check_installed(config.report_to)  # a missing extra fails before the output folder or the model is touched
    with output_lock(Path(config.output)) as existed:
        run = set_up(config, rank, world_size, device, existed)
        with RunLog(run.log_path, tuple(run.eval_sets), open_trackers(config, run.output, run.start_step)) as log:
            if config.init_adapter and run.start_step == 0:  # where it starts: `lora-rm eval --adapter`'s numbers
                run.evaluate(0, log)
            window, started = LogWindow(start=run.start_step), time.perf_counter()
            train_seconds = train_steps(run, log, window, started)
            return finish(run, log, window, started, train_seconds)  # the trackers close after it, failed on error


def set_up(config: TrainConfig, rank: int, world_size: int, device: torch.device, existed: bool = True) -> Run:
    """Output folder, seeds, model, data, optimizer, the run's length, and a resumed run's weights and position."""
    output = prepare_output(config, existed)
    random.seed(config.seed)
    torch.manual_seed(config.seed)  # the same on every rank: identical adapter init
    model, tokenizer = load_base(config, device)
    vocab_size = model.get_input_embeddings().num_embeddings  # pre-tokenized ids must stay under it
    train_pairs, eval_pairs = data.load_pairs(config, tokenizer, vocab_size)
    eval_sets = data.named_eval_sets(config, tokenizer, eval_pairs, vocab_size)
    packing_mode = packing.resolve_packing(config.packing, model, distributed.print_main,
                                           k_way_rows=ranking.is_ranking_rows(train_pairs),
                                           reentrant_under_torchrun=config.reentrant_checkpointing and world_size > 1,
                                           max_tokens_per_batch=config.max_tokens_per_batch)
    train_pairs = fit_to_budget(train_pairs, packing_mode, config, "train")
    eval_sets = {prefix: fit_to_budget(pairs, packing_mode, config, prefix) for prefix, pairs in eval_sets.items()}
    check_positions(model, [train_pairs, *eval_sets.values()])
    forward_model = prepare_model(model, config, device)
    if rank > 0:  # its own dropout stream; rank 0 goes on with the seed's
        torch.manual_seed(distributed.rank_seed(config.seed, rank, 0))
    optimizer = build_optimizer(model, config)
    lengths = [pair["length"] for pair in train_pairs]

    @functools.lru_cache(maxsize=1)  # one epoch's order at a time
    def epoch_batches(epoch: int) -> list[list[int]]:
        return data.batch_indices(lengths, config.batch_size, config.seed, epoch, config.group_by_length, rank,
                                  world_size)

    run = Run(config, device, output, model, forward_model, tokenizer, train_pairs, eval_sets, packing_mode,
              optimizer, torch.amp.GradScaler(device.type, enabled=config.precision == "fp16"), epoch_batches)
    run.n_batches = len(epoch_batches(0))
    data.check_step_fits(len(train_pairs), run.n_batches, config, world_size)
    run.total_steps = config.max_steps or max(1, int(config.epochs * run.steps_per_epoch))
    run.warmup_steps = warmup_steps_for(run.total_steps, config.warmup_ratio)
    global_batch = config.batch_size * world_size * config.grad_accum
    run.trainer_state = {"total_steps": run.total_steps, "world_size": world_size, "global_batch": global_batch}
    run.start_step = resume_from_latest_checkpoint(config, model, optimizer, run.checkpoints, global_batch)
    if distributed.is_main():
        truncate_log(run.log_path, run.start_step, run.total_steps)
        write_config(config, output)
        record_init(config, output)
    return run


def train_steps(run: Run, log: RunLog, window: LogWindow, started: float) -> float:
    """The loop, from the start (or resumed) step to the last: one optimizer step per iteration; returns its seconds
    (the final checkpoint, save and eval not included).

    Nothing in a step reads a value back from the device (a GPU would wait for it, health.py); the health flags,
    the loss and the gradient norm are read when a step logs or saves, before its update.
    """
    config, optimizer = run.config, run.optimizer
    health = Health(config.lr, run.checkpoints, lambda s: learning_rate(  # health counts steps from 1, as the log
        max(0, s - 1), run.total_steps, run.warmup_steps, config.lr, config.lr_schedule), run.scaler.is_enabled())
    progress = tqdm(total=run.total_steps, initial=run.start_step, disable=not config.progress or not
                    distributed.is_main(), desc="train")
    for step in range(run.start_step, run.total_steps):
        for group in optimizer.param_groups:  # adapter and head, each from its own peak
            group["lr"] = learning_rate(step, run.total_steps, run.warmup_steps, group["peak_lr"], config.lr_schedule)
        lr = optimizer.param_groups[0]["lr"]
        done = step + 1
        logs = done % config.log_every == 0 or done == run.total_steps
        saves = (config.save_every and done % config.save_every == 0) or done == run.total_steps

        # grad_accum micro-batches; their mean gradient makes one step
        losses, step_rewards = [], []
        for micro in range(step * config.grad_accum, (step + 1) * config.grad_accum):
            last = (micro + 1) % config.grad_accum == 0  # DDP all-reduces the gradients once a step, on the last
            loss, rewards_better, rewards_worse = micro_batch(run, run.batch_rows(micro), sync=last)
            window.add(loss, rewards_better, rewards_worse)
            losses.append(loss)
            step_rewards += [rewards_better, rewards_worse]

        # clip, check, step: a run gone wrong stops before it is logged or saved
        grad_norm = clip_gradients(optimizer, run.scaler, config.max_grad_norm)
        health.record(done, losses, grad_norm, step_rewards)
        if logs or saves:
            health.check(done)  # every step since the last check: loss, gradient norm, collapse
        with health.guard_update(done, lr, optimizer):
            optimizer_step(optimizer, run.scaler)
        if logs or saves:
            health.check_weights()  # after every update since the last check
        progress.update(1)
        if done == run.total_steps:
            train_seconds = distributed.synchronized_seconds(started)

        # log, evaluate, checkpoint on their intervals
        if logs:
            record = window.record(done, run.steps_per_epoch, grad_norm, lr, time.perf_counter() - started)
            log(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}")
        if config.eval_every and done % config.eval_every == 0 and done < run.total_steps:  # the final one follows
            for prefix, metrics in run.evaluate(done, log).items():
                progress.write(f"step {done}: {prefix} accuracy {metrics['accuracy']:.4f}")
        if saves:
            save_checkpoint(run.checkpoints, done, run.model, optimizer, run.trainer_state, config.keep_checkpoints)
    progress.close()
    return train_seconds if run.start_step < run.total_steps else 0.0


def micro_batch(run: Run, rows: list[dict[str, Any]], sync: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward, loss and backward of one micro-batch of pairs or K-way rows, padded or packed.

    Returns (loss, rewards of the better side of each pair, of the worse side); sync=False on every micro-batch
    but a step's last: DDP all-reduces the gradients once per step.
    """
    config = run.config

    def backward(loss: torch.Tensor) -> None:
        run.scaler.scale(loss / config.grad_accum).backward()

    if run.packing_mode == "none":
        batch = run.collate(rows)
        loss, rewards_better, rewards_worse = micro_batch_loss(run.forward_model, batch, config, run.device, sync)
        backward(loss)
        return loss, rewards_better, rewards_worse

    # a forward and a backward per packed run of the token budget (packing.py), with the same loss
    context = functools.partial(forward_context, run.forward_model, config.precision, run.device)
    return packing.packed_micro_batch(run.forward_model, rows, run.packing_mode, config.max_tokens_per_batch,
                                      run.tokenizer.pad_token_id, run.device, backward, context, sync,
                                      config.center_rewards_coefficient, loss_fn=bradley_terry_loss)


def forward_context(forward_model: nn.Module, precision: str, device, sync: bool) -> contextlib.ExitStack:
    """What a training forward runs under: DDP's no_sync unless the micro-batch syncs, and the autocast."""
    stack = contextlib.ExitStack()
    stack.enter_context(distributed.no_sync(forward_model, sync))
    stack.enter_context(autocast_context(precision, device))
    return stack


def micro_batch_loss(forward_model: nn.Module, batch: dict[str, torch.Tensor], config: TrainConfig, device,
                     sync: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A padded batch's ONE forward (every side of every row) and its fp32 loss: (loss, better, worse rewards).

    Pairs take the Bradley-Terry loss; K-way rows --ranking-loss, reporting every pair of responses whose scores
    differ.
    """
    batch = data.to_device(batch, device)
    with forward_context(forward_model, config.precision, device, sync):
        rewards = sequence_rewards(forward_model, batch)  # (N,) fp32, one per sequence
    if "group" in batch:  # K-way rows, position-major (ranking.collate_groups)
        loss = ranking_loss(config.ranking_loss, rewards, batch, config.center_rewards_coefficient)
        rewards_better, rewards_worse = rewards[batch["better"]], rewards[batch["worse"]]
    else:  # pairs: chosen rows first, then rejected rows
        rewards_better, rewards_worse = split_rewards(rewards)
        loss = bradley_terry_loss(rewards_better, rewards_worse, batch.get("margin"), config.center_rewards_coefficient)
    return loss, rewards_better.detach(), rewards_worse.detach()


def finish(run: Run, log: RunLog, window: LogWindow, started: float, train_seconds: float) -> dict[str, Any]:
    """The end: adapter and tokenizer saved, then every eval set's final metrics, written beside them.

    train_pairs_per_s counts the training steps alone; total_pairs_per_s the whole call after set-up (the final
    checkpoint, save and evaluation too).
    """
    adapter = distributed.full_tensors(adapter_state_dict(run.model))  # under FSDP every rank gathers, rank 0 writes
    if distributed.is_main():
        save_adapter(run.model, run.output, state=adapter)
        save_tokenizer(run.tokenizer, run.output)  # plain tokenizer(text) appends the EOS training did
    finals = run.evaluate(run.total_steps, log)  # train()'s `with` closes the trackers after this returns
    final = dict(next(iter(finals.values())))  # the first eval set's at the top, as with one
    if len(finals) > 1:
        final["eval_datasets"] = {prefix.removeprefix("eval_"): metrics for prefix, metrics in finals.items()}
    write_final_metrics(run.output, final, distributed.is_main())  # fails as eval does on a NaN or inf
    if distributed.is_main():
        write_adapter_card(run.output, run.config)  # README.md, from the files just written
    distributed.barrier()
    final["train_seconds"], final["total_seconds"] = train_seconds, time.perf_counter() - started
    all_pairs = distributed.sum_over_ranks([window.pairs_seen])[0]
    final["train_pairs_per_s"] = all_pairs / train_seconds if all_pairs and train_seconds else 0.0
    final["total_pairs_per_s"] = all_pairs / final["total_seconds"] if all_pairs else 0.0
    return final
