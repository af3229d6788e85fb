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
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import data, distributed, packing, ranking, sharded_load
from .adapter_io import adapter_state_dict, save_adapter
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .health import Health
from .inject import add_lora, enable_gradient_checkpointing, format_parameter_counts, lora_config_of, lora_layers
from .loss import bradley_terry_loss
from .model_io import autocast_context, load_model_and_tokenizer, save_tokenizer
from .run_folder import output_lock, prepare_output, write_config
from .run_log import LogWindow, RunLog, summary_writer_class, truncate_log
from .scoring import batch_rewards, eval_metrics, rewards_for_pairs

MIN_EVAL_PAIRS = 20  # an automatic eval split smaller than this gets a warning: its accuracy moves in steps of 5%+

def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, schedule: str) -> float:
    """transformers' linear/cosine schedule with linear warmup, as a pure function of the step."""
    if step < warmup_steps:
        return peak * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * max(0.0, 1.0 - progress)


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Warmup steps of a run, rounded up as transformers' TrainingArguments.get_warmup_steps (TRL's schedule)."""
    return math.ceil(warmup_ratio * total_steps)  # int() dropped a partial step: 0.1 of 6 steps gave no warmup


def load_pairs(config: TrainConfig, tokenizer) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Tokenized (train, eval) pairs; without an eval dataset, the last eval_fraction of the training rows."""
    train_data = data.load_preference_dataset(config.dataset, config.split, config.max_rows, config.rows, config.seed)
    if config.eval_dataset is not None:  # several: the first here, the others in named_eval_sets
        eval_data = data.load_preference_dataset(
            eval_sources(config)[0], config.eval_split, config.max_eval_rows, config.eval_rows
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


def eval_sources(config: TrainConfig) -> list[str]:
    """The --eval-dataset values as a list (one or several; none: empty)."""
    if config.eval_dataset is None:
        return []
    return [config.eval_dataset] if isinstance(config.eval_dataset, str) else list(config.eval_dataset)


def eval_set_name(source: str) -> str:
    """A short name of an eval dataset for log keys: the file name without its suffixes, or a hub id's last part."""
    name = Path(source).name
    for suffix in (".gz", ".jsonl", ".json", ".parquet", ".csv"):
        name = name.removesuffix(suffix)
    return name or source


def named_eval_sets(config: TrainConfig, tokenizer, first: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Log-key prefix -> eval pairs: "eval" for one eval set (the keys as ever), "eval_<name>" for each of several.

    "eval_<name>_accuracy" is the key transformers' Trainer logs for a dict of eval datasets. Every eval set takes
    eval_split, eval_rows and max_eval_rows.
    """
    sources = eval_sources(config)
    if len(sources) < 2:
        return {"eval": first}
    names = [eval_set_name(source) for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--eval-dataset: several datasets are named {repeated} (file name or hub id's last part); "
                         "rename the files so that each is logged under its own name")
    sets = {f"eval_{names[0]}": first}
    for source, name in zip(sources[1:], names[1:], strict=True):
        rows = data.load_preference_dataset(source, config.eval_split, config.max_eval_rows, config.eval_rows)
        sets[f"eval_{name}"] = tokenize(rows, tokenizer, config, f"eval {name}")
    return sets


def tokenize(dataset, tokenizer, config: TrainConfig, name: str) -> list[dict[str, Any]]:
    """Tokenized pairs as plain dicts, with what the length policy and bad-row skipping did printed."""
    pairs, stats = data.tokenize_pairs(
        dataset, tokenizer, config.max_length, config.length_policy, config.skip_bad_rows
    )
    distributed.print_main(f"{name} pairs: {stats}")
    if not len(pairs):
        raise ValueError(f"no {name} pairs left after tokenization ({stats}); raise --max-length or check the data")
    return pairs.to_list()


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
    """AdamW over adapter and head only; the head may have its own learning rate.

    LoRA+ (Hayou et al. 2024; PEFT's create_loraplus_optimizer): lr_B = loraplus_lr_ratio x lr_A. With B = 0 at
    init and B's fan-in r far below A's fan-in d_in, one learning rate is either too small for B or too large for A;
    a larger step on B lets the update B A grow as fast as the features need (the paper suggests a ratio of 16).
    The head keeps its own group at head_lr (PEFT puts a 2-D head weight in A's group at lr, the same as ours by
    default, but every 1-D parameter, e.g. a head bias, in B's group: a rule for lora_B's bias, not for a head).
    """
    head_names = tuple(f"{name}." for name in lora_config_of(model).modules_to_save)
    head, adapter = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if name.startswith(head_names) else adapter).append(param)
    groups = [{"params": adapter, "lr": config.lr, "peak_lr": config.lr}]
    if config.loraplus_lr_ratio is not None:  # group 0 stays A's, at lr: the lr logged and checked
        ids_B = {id(layer.lora_B.weight) for _, layer in lora_layers(model)}
        # PEFT's rule puts every 1-D adapter tensor in B's group: DoRA's magnitude m too
        ids_B |= {id(layer.lora_magnitude_vector) for _, layer in lora_layers(model) if layer.use_dora}
        lr_B = config.lr * config.loraplus_lr_ratio
        groups = [{"params": [p for p in adapter if id(p) not in ids_B], "lr": config.lr, "peak_lr": config.lr},
                  {"params": [p for p in adapter if id(p) in ids_B], "lr": lr_B, "peak_lr": lr_B}]
    head_lr = config.head_lr or config.lr
    groups.append({"params": head, "lr": head_lr, "peak_lr": head_lr})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def resume_from_latest_checkpoint(
    config: TrainConfig, model: nn.Module, optimizer, checkpoints: Path, global_batch: int
) -> int:
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
    if "group" in batch:  # K-way rows: --ranking-loss; the pairs returned are every pair with different scores
        return ranking.micro_batch_loss(forward_model, batch, config, device, sync)
    batch = {key: tensor.to(device) for key, tensor in batch.items()}
    with distributed.no_sync(forward_model, sync), autocast_context(config.precision, device):
        rewards_chosen, rewards_rejected = batch_rewards(forward_model, batch)
    loss = bradley_terry_loss(rewards_chosen, rewards_rejected, batch.get("margin"), config.center_rewards_coefficient)
    return loss, rewards_chosen.detach(), rewards_rejected.detach()


def packed_micro_batch_loss(forward_model: nn.Module, model: nn.Module, pairs: list[dict[str, Any]],
                            config: TrainConfig, mode: str, pad_token_id: int | None, device, sync: bool,
                            backward) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """micro_batch_loss for a packed mode, its backward done run by run (lora_rm/packing.py)."""

    def forward_context(sync_run: bool) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(distributed.no_sync(forward_model, sync_run))
        stack.enter_context(autocast_context(config.precision, device))
        return stack

    return packing.packed_micro_batch(forward_model, model, pairs, mode, config.max_tokens_per_batch, pad_token_id,
                                      device, backward, forward_context, sync, config.center_rewards_coefficient,
                                      loss_fn=bradley_terry_loss)  # the loss micro_batch_loss uses (one name)


def fit_to_budget(pairs: list[dict[str, Any]], mode: str, config: TrainConfig, name: str) -> list[dict[str, Any]]:
    """Pairs that pack within --max-tokens-per-batch, the others dropped or cut by the length policy (printed)."""
    kept, changed = packing.fit_pairs_to_budget(pairs, mode, config.max_tokens_per_batch, config.length_policy)
    if changed:
        distributed.print_main(f"{name} pairs over --max-tokens-per-batch {config.max_tokens_per_batch}: {changed} "
                               f"({config.length_policy})")
    if not kept:
        raise ValueError(f"no {name} pairs fit --max-tokens-per-batch {config.max_tokens_per_batch}; raise it")
    return kept


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


def evaluate(model, pairs, collator, batch_size: int, device, precision: str = "fp32",
             **packed: Any) -> dict[str, Any]:
    """Metrics over every eval pair (rewards concatenated first, so the means are exact, not batch means).

    Under torchrun each rank scores its contiguous shard and the rewards are gathered in order before the means.
    Shards are padded to equal length and the padding's rewards dropped: under FSDP every forward is a collective.
    """
    if ranking.is_ranking_rows(pairs):  # K-way rows: top-1, pairwise accuracy, Kendall's tau
        return ranking.evaluate_rows(model, pairs, collator, batch_size, device, precision)
    mine, n_real = distributed.equal_shard(pairs)
    chosen, rejected = rewards_for_pairs(model, mine, collator, batch_size, device, precision, **packed)
    return eval_metrics(distributed.gather_cat(chosen[:n_real]), distributed.gather_cat(rejected[:n_real]))


def train(config: TrainConfig) -> dict[str, Any]:
    """Train a LoRA reward model as configured, holding OUTPUT/.lock throughout; returns the final eval metrics."""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world_size, device = distributed.init_from_env(device)  # (0, 1, device) outside torchrun
    if config.report_to == "tensorboard":
        summary_writer_class()  # a missing extra fails before the output folder or the model is touched
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
    eval_sets = named_eval_sets(config, tokenizer, eval_pairs)
    packing_mode = packing.resolve_packing(config.packing, model, distributed.print_main)
    unpacked = {"K-way rows": ranking.is_ranking_rows(train_pairs),  # not wired to them yet
                # gives other gradients than one process (DDP's static_graph; one process is exact): not found yet
                "reentrant checkpointing under torchrun": config.reentrant_checkpointing and world_size > 1}
    for reason in [reason for reason, holds in unpacked.items() if holds and packing_mode != "none"]:
        if config.packing != "auto":
            raise ValueError(f"--packing {config.packing} is not supported with {reason} yet; use --packing none")
        distributed.print_main(f"packing auto: {reason}; using --packing none (padded rows)")
        packing_mode = "none"
    train_pairs = fit_to_budget(train_pairs, packing_mode, config, "train")
    eval_sets = {prefix: fit_to_budget(pairs, packing_mode, config, prefix) for prefix, pairs in eval_sets.items()}
    collator = functools.partial(data.collate_rows, pad_token_id=tokenizer.pad_token_id)  # pairs or K-way rows
    packed = dict(packing=packing_mode, max_tokens_per_batch=config.max_tokens_per_batch,
                  pad_token_id=tokenizer.pad_token_id)
    forward_model = prepare_model(model, config, device)
    if rank > 0:  # its own dropout stream; rank 0 goes on with the seed's
        torch.manual_seed(distributed.rank_seed(config.seed, rank, 0))
    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")

    # -- how long: batches of this rank per epoch (a pure function of seed and epoch), steps, intervals
    lengths = [pair["length"] for pair in train_pairs]

    @functools.lru_cache(maxsize=1)  # one epoch's order at a time
    def epoch_batches(epoch: int) -> list[list[int]]:
        return data.batch_indices(lengths, config.batch_size, config.seed, epoch, config.group_by_length, rank,
                                  world_size)

    n_batches = len(epoch_batches(0))
    steps_per_epoch = max(1, n_batches // config.grad_accum)
    total_steps = config.max_steps or max(1, int(config.epochs * steps_per_epoch))
    warmup_steps = warmup_steps_for(total_steps, config.warmup_ratio)
    global_batch = config.batch_size * world_size * config.grad_accum
    trainer_state = {"total_steps": total_steps, "world_size": world_size, "global_batch": global_batch}

    start_step = resume_from_latest_checkpoint(config, model, optimizer, checkpoints, global_batch)
    if distributed.is_main():
        truncate_log(log_path, start_step, total_steps)
        write_config(config, output)

    # -- the loop
    log = RunLog(log_path, config.report_to, tuple(eval_sets))
    window, started = LogWindow(start=start_step), time.perf_counter()
    health = Health(config.lr, checkpoints, previous_lr=learning_rate(
        max(0, start_step - 1), total_steps, warmup_steps, config.lr, config.lr_schedule))
    progress = tqdm(total=total_steps, initial=start_step, disable=not config.progress or rank > 0, desc="train")
    for step in range(start_step, total_steps):
        for group in optimizer.param_groups:  # adapter and head, each from its own peak
            group["lr"] = learning_rate(step, total_steps, warmup_steps, group["peak_lr"], config.lr_schedule)
        lr = optimizer.param_groups[0]["lr"]

        # grad_accum micro-batches; their mean gradient makes one step
        step_rewards = []
        for micro in range(step * config.grad_accum, (step + 1) * config.grad_accum):
            epoch, position = divmod(micro, n_batches)
            batch_pairs = [train_pairs[i] for i in epoch_batches(epoch)[position]]
            last = (micro + 1) % config.grad_accum == 0
            if packing_mode == "none":
                loss, rewards_chosen, rewards_rejected = micro_batch_loss(
                    forward_model, collator(batch_pairs), config, device, last)
                health.check_loss(loss, step)
                scaler.scale(loss / config.grad_accum).backward()
            else:  # forward and backward per packed run (the token budget), so check the loss after
                loss, rewards_chosen, rewards_rejected = packed_micro_batch_loss(
                    forward_model, model, batch_pairs, config, packing_mode, tokenizer.pad_token_id, device, last,
                    lambda part: scaler.scale(part / config.grad_accum).backward())
                health.check_loss(loss, step)
            window.add(loss, rewards_chosen, rewards_rejected)
            step_rewards += [rewards_chosen, rewards_rejected]

        # clip, check, step: a run gone wrong stops before it is logged or saved
        grad_norm = clip_gradients(optimizer, scaler, config.max_grad_norm)
        health.check_gradients(grad_norm, step_rewards, step, scaled=scaler.is_enabled())
        with health.guard_update(step, lr, optimizer):
            optimizer_step(optimizer, scaler)
        progress.update(1)

        # log, evaluate, checkpoint on their intervals
        done = step + 1
        if done % config.log_every == 0 or done == total_steps:
            record = window.record(done, steps_per_epoch, grad_norm, lr, time.perf_counter() - started)
            log(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}")
        if config.eval_every and done % config.eval_every == 0 and done < total_steps:  # the final one follows
            for prefix, pairs in eval_sets.items():
                interim = evaluate(model, pairs, collator, config.batch_size, device, config.precision, **packed)
                log({"step": done, **{f"{prefix}_{k}": v for k, v in interim.items()}})
                progress.write(f"step {done}: {prefix} accuracy {interim['accuracy']:.4f}")
        if (config.save_every and done % config.save_every == 0) or done == total_steps:
            save_checkpoint(checkpoints, done, model, optimizer, trainer_state, config.keep_checkpoints)
    progress.close()

    # -- the end: adapter and tokenizer, final evaluation
    adapter = distributed.full_tensors(adapter_state_dict(model))  # under FSDP every rank gathers, rank 0 writes
    if distributed.is_main():
        save_adapter(model, output, state=adapter)
        save_tokenizer(tokenizer, output)  # plain tokenizer(text) appends the EOS training did
    finals = {}
    for prefix, pairs in eval_sets.items():
        finals[prefix] = evaluate(model, pairs, collator, config.batch_size, device, config.precision, **packed)
        log({"step": total_steps, **{f"{prefix}_{k}": v for k, v in finals[prefix].items()}})
    log.close()
    final = dict(next(iter(finals.values())))  # the first eval set's at the top, as with one
    if len(finals) > 1:
        final["eval_datasets"] = {prefix.removeprefix("eval_"): metrics for prefix, metrics in finals.items()}
    if distributed.is_main():
        (output / "reward_stats.json").write_text(json.dumps(final["reward_stats"], indent=2))
        (output / "eval_metrics.json").write_text(json.dumps(final, indent=2))
    distributed.barrier()
    final["train_seconds"] = time.perf_counter() - started
    all_pairs = distributed.sum_over_ranks([window.pairs_seen])[0]
    final["train_pairs_per_s"] = all_pairs / final["train_seconds"] if all_pairs else 0.0
    return final
