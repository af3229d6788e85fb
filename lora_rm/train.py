"""The Bradley-Terry training loop, written out: set-up, then one flat loop over optimizer steps.

Each step: set the learning rate, run grad_accum micro-batches (chosen and rejected of a batch in ONE
forward pass), clip, step, zero the grads, log; evaluate and checkpoint on intervals. The step number
alone fixes the position in the data (batch order is a pure function of seed and epoch), so a resumed
run replays exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import data, distributed
from .adapter_io import adapter_state_dict, save_adapter
from .builtin import builtin_model, builtin_preference_dataset, builtin_tokenizer
from .checkpoint import list_checkpoints, load_checkpoint, rng_tensors, save_checkpoint
from .config import TrainConfig
from .inject import add_lora, enable_gradient_checkpointing, format_parameter_counts, lora_config_of
from .loss import bradley_terry_loss, preference_metrics, reward_stats, split_rewards

BUILTIN = "builtin"
BUILTIN_PAIRS = 2000


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is left untouched."""


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, schedule: str) -> float:
    """transformers' linear/cosine schedule with linear warmup, as a pure function of the step."""
    if step < warmup_steps:
        return peak * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * max(0.0, 1.0 - progress)


def load_model_and_tokenizer(name: str, trust_remote_code: bool = False):
    """A (model, tokenizer) pair with a pad token on both; "builtin" builds the same tiny offline model each time."""
    if name == BUILTIN:
        tokenizer = builtin_tokenizer()
        return builtin_model(tokenizer), tokenizer
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        name, num_labels=1, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    message = data.ensure_pad_token(tokenizer, model)
    if message:
        print(message)
    return model, tokenizer


def load_rows(source: str, split: str, limit: int | None = None, rows: str | None = None, seed: int = 0):
    """Preference rows from a hub id or local path, or the built-in arithmetic task ("builtin")."""
    if source == BUILTIN:
        dataset = builtin_preference_dataset(BUILTIN_PAIRS, seed=seed)
        return dataset.select(range(min(limit or len(dataset), len(dataset))))
    return data.load_preference_dataset(source, split, limit, rows)


def load_datasets(config: TrainConfig):
    """(train rows, eval rows) as datasets.Dataset; a held-out tail when no eval set is named."""
    rows = load_rows(config.dataset, config.split, config.max_pairs, config.rows, config.seed)
    if config.eval_dataset is not None:
        eval_rows = load_rows(config.eval_dataset, config.eval_split, config.max_eval_pairs, config.eval_rows)
        return rows, eval_rows
    n_eval = max(1, int(len(rows) * config.eval_fraction))
    return rows.select(range(len(rows) - n_eval)), rows.select(range(len(rows) - n_eval, len(rows)))


def tokenize(rows, tokenizer, config: TrainConfig, name: str) -> list[dict[str, Any]]:
    """Tokenized pairs as plain dicts, with what the length policy and bad-row skipping did printed."""
    pairs, stats = data.tokenize_pairs(rows, tokenizer, config.max_length, config.length_policy, config.skip_bad_rows)
    distributed.print_main(f"{name} pairs: {stats}")
    if not len(pairs):
        raise ValueError(f"no {name} pairs left after tokenization ({stats}); raise --max-length or check the data")
    return pairs.to_list()


def pair_collator(tokenizer) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """collate_pairs bound to this tokenizer's pad id; always right padding, as TRL (GPT-2 scores left pads wrong)."""
    return functools.partial(data.collate_pairs, pad_token_id=tokenizer.pad_token_id, padding_side="right")


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
        shutil.rmtree(output)
    if distributed.is_main():
        output.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return output


def autocast_context(precision: str, device: torch.device):
    """bf16/fp16 autocast (the loss itself is computed in fp32 by bradley_terry_loss)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def pair_rewards(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over chosen rows then rejected rows; the reward is read at each row's last real token."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return split_rewards(logits.float())  # (2B, 1) -> (B,), (B,)


@torch.no_grad()
def rewards_for_pairs(model, pairs, collator, batch_size: int, device, precision: str = "fp32"):
    """(chosen, rejected) rewards of every pair, in order, as two CPU fp32 tensors."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collator(pairs[start : start + batch_size]).items()}
        with autocast_context(precision, device):
            rewards_chosen, rewards_rejected = pair_rewards(model, batch)
        chosen.append(rewards_chosen.cpu())
        rejected.append(rewards_rejected.cpu())
    model.train(was_training)
    if not chosen:  # a rank whose eval shard is empty
        return torch.empty(0), torch.empty(0)
    return torch.cat(chosen), torch.cat(rejected)


def evaluate(model, pairs, collator, batch_size: int, device, precision: str = "fp32") -> dict[str, Any]:
    """Metrics over every eval pair (rewards concatenated first, so the means are exact, not batch means).

    Under torchrun each rank scores its contiguous shard and the rewards are gathered in order before the means.
    Shards are padded to equal length and the padding's rewards dropped: under FSDP every forward is a collective.
    """
    mine, n_real = distributed.equal_shard(pairs)
    chosen, rejected = rewards_for_pairs(model, mine, collator, batch_size, device, precision)
    return eval_metrics(distributed.gather_cat(chosen[:n_real]), distributed.gather_cat(rejected[:n_real]))


def eval_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, Any]:
    """Preference metrics plus the reward mean/std a policy trainer normalises with."""
    return {
        **preference_metrics(chosen, rejected),
        "n_pairs": len(chosen),
        "reward_stats": reward_stats(torch.cat([chosen, rejected])),
    }


def evaluate_rows(
    model, tokenizer, rows, max_length: int | None, length_policy: str = "drop", skip_bad_rows: bool = False,
    batch_size: int = 8, report: str | Path | None = None, log: str | Path | None = None,
) -> tuple[dict[str, Any], data.DataStats, list[Path]]:
    """Tokenize preference rows, score them and optionally write the reward report: (metrics, stats, report files)."""
    pairs, stats = data.tokenize_pairs(rows, tokenizer, max_length, length_policy, skip_bad_rows)
    pairs = pairs.to_list()
    device = next(model.parameters()).device
    chosen, rejected = rewards_for_pairs(model, pairs, pair_collator(tokenizer), batch_size, device)
    metrics = eval_metrics(chosen, rejected)
    written = []
    if report:
        from .report import write_report  # matplotlib is optional

        lengths_chosen = [len(pair["chosen_ids"]) for pair in pairs]
        lengths_rejected = [len(pair["rejected_ids"]) for pair in pairs]
        written = write_report(report, chosen, rejected, lengths_chosen, lengths_rejected, metrics, log)
    return metrics, stats, written


@torch.no_grad()
def score_texts(model, tokenizer, items: list, max_length: int | None = None, batch_size: int = 8) -> list[float]:
    """One reward per text (or chat), encoded exactly as training encoded each side (EOS included)."""
    device = next(model.parameters()).device
    rewards = []
    for start in range(0, len(items), batch_size):
        sides = [data.encode_text(tokenizer, None, item) for item in items[start : start + batch_size]]
        too_long = [start + i for i, ids in enumerate(sides) if max_length and len(ids) > max_length]
        if too_long:
            raise ValueError(f"texts {too_long} are longer than max_length={max_length} tokens")
        input_ids, attention_mask = data.pad_sequences(sides, tokenizer.pad_token_id, "right")
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
        rewards.extend(logits.squeeze(-1).float().tolist())
    return rewards


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout of the base to p=0, as TRL's RewardTrainer does by default (disable_dropout=True)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


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


def log_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drop log records after the checkpoint we resume from: those steps are about to be replayed."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def train(config: TrainConfig) -> dict[str, Any]:
    """Train a LoRA reward model as configured; returns the final eval metrics."""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world_size, device = distributed.init_from_env(device)  # (0, 1, device) outside torchrun
    output = prepare_output(config)
    random.seed(config.seed)
    torch.manual_seed(config.seed)  # the same on every rank: identical adapter init

    model, tokenizer = load_model_and_tokenizer(config.model, config.trust_remote_code)
    train_rows, eval_rows = load_datasets(config)
    train_pairs = tokenize(train_rows, tokenizer, config, "train")
    eval_pairs = tokenize(eval_rows, tokenizer, config, "eval")
    collator = pair_collator(tokenizer)

    if config.disable_dropout:
        disable_dropout(model)
    add_lora(model, config.lora)
    fsdp = config.fsdp and world_size > 1
    if config.fsdp and not fsdp:
        print("fsdp: one process, nothing to shard; training unsharded")
    model.train()
    if not fsdp:  # under FSDP, fully_shard moves each unit to the device as it shards it: the model need not fit
        model.to(device)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model, use_reentrant=config.reentrant_checkpointing)
    distributed.print_main(format_parameter_counts(model))
    forward_model = model  # what the micro-batches run through; `model` stays the plain module for eval and saving
    if fsdp:  # fully_shard turns `model` itself into the sharded module
        n_layers = distributed.wrap_fsdp(model, device)
        distributed.print_main(f"FSDP over {world_size} processes: {n_layers} decoder layers + the root sharded")
    elif world_size > 1:
        reentrant = config.gradient_checkpointing and config.reentrant_checkpointing
        forward_model = distributed.wrap_ddp(model, device, static_graph=reentrant)
        n_sent = sum(p.numel() for p in distributed.communicated_parameters(forward_model))
        distributed.print_main(f"DDP over {world_size} processes: {n_sent:,} adapter + head parameters all-reduced")
    if rank > 0:  # its own dropout stream; rank 0 goes on with the seed's
        torch.manual_seed(distributed.rank_seed(config.seed, rank, 0))
    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")

    lengths = [pair["length"] for pair in train_pairs]
    rank_batches = functools.partial(  # this rank's share of every global batch, for one epoch
        data.batch_indices, lengths, config.batch_size, config.seed,
        group_by_length=config.group_by_length, rank=rank, world_size=world_size,
    )
    n_batches = len(rank_batches(epoch=0))
    steps_per_epoch = max(1, n_batches // config.grad_accum)
    total_steps = config.max_steps or max(1, int(config.epochs * steps_per_epoch))
    warmup_steps = int(config.warmup_ratio * total_steps)
    eval_every = config.eval_every or total_steps
    save_every = config.save_every or total_steps

    start_step, checkpoints = 0, output / "checkpoints"
    global_batch = config.batch_size * world_size * config.grad_accum
    saved = list_checkpoints(checkpoints) if config.resume else []
    if saved:  # every rank loads the latest: DDP replicates all it holds
        state = load_checkpoint(saved[-1], model, optimizer, config.seed)
        start_step = state["step"]
        distributed.print_main(f"resumed from step {start_step}")
        if state.get("global_batch", global_batch) != global_batch:
            distributed.print_main(
                f"warning: {state['global_batch']} pairs per step were saved, {global_batch} now; the data "
                "position and schedule no longer replay the saved run (keep batch_size * processes * grad_accum)"
            )
    log_path = output / "log.jsonl"
    if distributed.is_main():
        truncate_log(log_path, start_step)
        (output / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))

    epoch_batches: dict[int, list[list[int]]] = {}
    progress = tqdm(total=total_steps, initial=start_step, disable=not config.progress or rank > 0, desc="train")
    started, pairs_seen = time.perf_counter(), 0
    window_losses, window_chosen, window_rejected = [], [], []  # since the last log line, as HF Trainer averages
    for step in range(start_step, total_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total_steps, warmup_steps, group["peak_lr"], config.lr_schedule)
        for micro in range(step * config.grad_accum, (step + 1) * config.grad_accum):
            epoch, position = divmod(micro, n_batches)
            if epoch not in epoch_batches:
                epoch_batches = {epoch: rank_batches(epoch=epoch)}
            batch_pairs = [train_pairs[i] for i in epoch_batches[epoch][position]]
            batch = {k: v.to(device) for k, v in collator(batch_pairs).items()}
            sync = (micro + 1) % config.grad_accum == 0  # DDP all-reduces after the last micro-batch only
            with distributed.no_sync(forward_model, sync), autocast_context(config.precision, device):
                rewards_chosen, rewards_rejected = pair_rewards(forward_model, batch)
            loss = bradley_terry_loss(
                rewards_chosen, rewards_rejected, batch.get("margin"), config.center_rewards_coefficient
            )
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss.item()} at step {step}; nothing was updated with it. The last good "
                    f"checkpoint is in {checkpoints}. Lower --lr, use fp32/bf16, or check the data"
                )
            scaler.scale(loss / config.grad_accum).backward()
            window_losses.append(loss.item())
            window_chosen.append(rewards_chosen.detach())
            window_rejected.append(rewards_rejected.detach())
            pairs_seen += len(batch_pairs)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], config.max_grad_norm or float("inf")
        )
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        progress.update(1)

        done = step + 1
        if done % config.log_every == 0 or done == total_steps:
            chosen, rejected = (distributed.gather_cat(torch.cat(r)) for r in (window_chosen, window_rejected))
            metrics = preference_metrics(chosen, rejected)
            loss_sum, n_losses, all_pairs = distributed.sum_over_ranks(
                [sum(window_losses), len(window_losses), pairs_seen]
            )
            window_losses, window_chosen, window_rejected = [], [], []
            elapsed = time.perf_counter() - started
            record = {
                "step": done,
                "epoch": round(done / steps_per_epoch, 4),
                "loss": loss_sum / n_losses,
                "accuracy": metrics["accuracy"],
                "margin": metrics["mean_margin"],
                "grad_norm": distributed.full_tensor(grad_norm).item(),  # a DTensor under FSDP
                "lr": optimizer.param_groups[0]["lr"],
                "pairs_per_s": all_pairs / elapsed,
            }
            if distributed.is_main():
                log_line(log_path, record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}")
        if done % eval_every == 0 and done < total_steps:  # the final evaluation follows the loop
            interim = evaluate(model, eval_pairs, collator, config.batch_size, device, config.precision)
            if distributed.is_main():
                log_line(log_path, {"step": done, **{f"eval_{k}": v for k, v in interim.items()}})
                progress.write(f"step {done}: eval accuracy {interim['accuracy']:.4f}")
        if done % save_every == 0 or done == total_steps:
            rng = distributed.gather_rng_states(rng_tensors())  # a collective: every rank takes part
            adapter = distributed.full_tensors(adapter_state_dict(model))  # collectives under FSDP, too
            optimizer_state = distributed.full_optimizer_state(model, optimizer)
            if distributed.is_main():
                trainer_state = {"total_steps": total_steps, "world_size": world_size, "global_batch": global_batch}
                save_checkpoint(
                    checkpoints, done, model, optimizer, trainer_state, config.keep_checkpoints, rng, adapter,
                    optimizer_state,
                )
            distributed.barrier()  # nobody goes on (or resumes) before the checkpoint is complete
    progress.close()

    adapter = distributed.full_tensors(adapter_state_dict(model))  # under FSDP every rank gathers, rank 0 writes
    if distributed.is_main():
        save_adapter(model, output, state=adapter)
        tokenizer.save_pretrained(output)
    final = evaluate(model, eval_pairs, collator, config.batch_size, device, config.precision)
    if distributed.is_main():
        log_line(log_path, {"step": total_steps, **{f"eval_{k}": v for k, v in final.items()}})
        (output / "reward_stats.json").write_text(json.dumps(final["reward_stats"], indent=2))
        (output / "eval_metrics.json").write_text(json.dumps(final, indent=2))
    distributed.barrier()
    final["train_seconds"] = time.perf_counter() - started
    all_pairs = distributed.sum_over_ranks([pairs_seen])[0]
    final["train_pairs_per_s"] = all_pairs / final["train_seconds"] if all_pairs else 0.0
    return final
