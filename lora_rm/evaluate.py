"""Scoring with a reward model and evaluating it: rewards of pairs, K-way rows and plain texts, and their metrics.

The reward of a text is the score head's output at its last real token (lora_rm/data.py says which token
that is). Pairs are scored in one forward: chosen rows first, then rejected rows, padded right as TRL does; K-way
rows stack every response of a batch into one forward. evaluate() is what training logs; evaluate_dataset is
`lora-rm eval` (with the length-only baselines, the report and the predictions file); score_texts is `lora-rm score`
on a list (scoring.py streams a file through score_by_length).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import data, distributed, encode, ranking, rewardbench
from .atomic import atomic_path
from .eval_stats import finite_or_none, pair_report
from .loss import ordered_pairs, preference_metrics, ranking_metrics, reward_stats, split_rewards
from .model_io import autocast_context
from .packing import fit_pairs_to_budget, is_encoder, pack_groups, packed_rewards, pair_rewards, resolve_packing
from .plots import write_report


def pair_collator(tokenizer) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """collate_pairs bound to this tokenizer's pad id."""
    return functools.partial(data.collate_pairs, pad_token_id=tokenizer.pad_token_id)


def sequence_rewards(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """One forward over every row of a collated batch: (N,) fp32 rewards, each read at its row's last real token."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return logits.float().squeeze(-1)  # (N, 1) -> (N,)


def batch_rewards(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) rewards of a collated batch of pairs: chosen rows first, then rejected rows."""
    return split_rewards(sequence_rewards(model, batch))


@torch.no_grad()
def rewards_for_pairs(model, pairs, collator, batch_size: int, device, precision: str = "fp32",
                      packing: str = "none", max_tokens_per_batch: int | None = None, pad_token_id: int | None = None):
    """(chosen, rejected) rewards of every pair, in order, as two CPU fp32 tensors.

    packing is a resolved mode (packing.resolve_packing); packed modes need the tokenizer's pad_token_id.
    """
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        with autocast_context(precision, device):
            if packing == "none":
                batch = data.to_device(collator(pairs[start : start + batch_size]), device)
                rewards_chosen, rewards_rejected = batch_rewards(model, batch)
            else:
                rewards_chosen, rewards_rejected = pair_rewards(
                    model, pairs[start : start + batch_size], packing, max_tokens_per_batch, pad_token_id,
                    device)
        chosen.append(rewards_chosen.cpu())
        rejected.append(rewards_rejected.cpu())
    model.train(was_training)
    if not chosen:  # a rank whose eval shard is empty
        return torch.empty(0), torch.empty(0)
    return torch.cat(chosen), torch.cat(rejected)


def eval_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, Any]:
    """Preference metrics plus the reward mean/std a policy trainer normalises with."""
    return {
        **preference_metrics(chosen, rejected),
        "n_pairs": len(chosen),
        "reward_stats": reward_stats(torch.cat([chosen, rejected])),
    }


def evaluate_dataset(
    model, tokenizer, dataset, max_length: int | None, length_policy: str = "drop", skip_bad_rows: bool = False,
    batch_size: int = 8, report: str | Path | None = None, log: str | Path | None = None,
    sections: dict[str, list[str]] | None = None, packing: str = "auto", max_tokens_per_batch: int | None = None,
    predictions: str | Path | None = None,
) -> tuple[dict[str, Any], encode.DataStats, list[Path]]:
    """Tokenize preference rows, score them and optionally write the reward report: (metrics, stats, report files).

    The metrics carry eval_stats.pair_report's length-only baselines and intervals; per subset, macro and per
    section when the rows have a `subset` column (sections: {section: [subsets]}). predictions: a JSONL file with
    each scored pair's id and rewards (write_predictions).
    """
    if sections and "subset" not in dataset.column_names:
        raise ValueError(f"--sections needs a 'subset' column in the data; it has {dataset.column_names}")
    if predictions:
        dataset = with_pair_ids(dataset)
    data.check_subsets(dataset)
    vocab_size = model.get_input_embeddings().num_embeddings
    tokenized, stats = data.tokenize_pairs(dataset, tokenizer, max_length, length_policy, skip_bad_rows, vocab_size)
    pairs = tokenized.to_list()
    if not pairs:
        raise ValueError(data.no_pairs_left("eval", stats, max_length))
    device = next(model.parameters()).device
    k_way = ranking.is_ranking_rows(pairs)
    mode = resolve_packing(packing, model, print if not k_way else lambda message: None, k_way_rows=k_way,
                           max_tokens_per_batch=max_tokens_per_batch)
    if k_way and predictions:
        raise ValueError("--predictions writes one line per pair; these rows are K-way rankings")
    if k_way:  # K-way rows, scored padded (an explicit packed mode was refused): top-1, pairwise, Kendall's tau
        metrics, written = evaluate_ranking_rows(model, tokenizer, pairs, batch_size, device, report, log)
        return metrics, stats, written
    pairs, over_budget = fit_pairs_to_budget(pairs, mode, max_tokens_per_batch, length_policy)
    if over_budget:
        print(f"{over_budget} pairs over --max-tokens-per-batch {max_tokens_per_batch}: {length_policy}")
    if not pairs:
        raise ValueError(f"no eval pairs left: all {over_budget} were over --max-tokens-per-batch "
                         f"{max_tokens_per_batch} ({length_policy}); raise it")
    chosen, rejected = rewards_for_pairs(model, pairs, pair_collator(tokenizer), batch_size, device,
                                         packing=mode, max_tokens_per_batch=max_tokens_per_batch,
                                         pad_token_id=tokenizer.pad_token_id)
    metrics = eval_metrics(chosen, rejected)
    if predictions:
        write_predictions(predictions, [pair[data.PAIR_ID] for pair in pairs], chosen, rejected)
    lengths_chosen = [len(pair["chosen_ids"]) for pair in pairs]
    lengths_rejected = [len(pair["rejected_ids"]) for pair in pairs]
    subsets = [pair["subset"] for pair in pairs] if "subset" in tokenized.column_names else None
    full_chosen, full_rejected = lengths_chosen, lengths_rejected
    if stats.n_truncated:  # the length-only rules compare whole sides: cut to max_length, both would often tie
        full, _ = data.tokenize_pairs(dataset, tokenizer, None, length_policy, skip_bad_rows, vocab_size)  # same rows
        full_chosen = [len(ids) for ids in full["chosen_ids"]]
        full_rejected = [len(ids) for ids in full["rejected_ids"]]
    metrics.update(pair_report(chosen, rejected, full_chosen, full_rejected, subsets, sections))
    written = []
    if report:
        written = write_report(report, chosen, rejected, lengths_chosen, lengths_rejected, metrics, log)
    return metrics, stats, written


def evaluate_benchmark(model, tokenizer, dataset, benchmark: str, max_length: int | None,
                       length_policy: str = "drop", batch_size: int = 8) -> tuple[dict[str, Any], encode.DataStats]:
    """`lora-rm eval --benchmark`: RewardBench's official scores (rewardbench.py) beside lora-rm's usual metrics.

    Every row counts in an official score, so a row dropped for its length is an error, not a skip; scored padded.
    """
    v2 = benchmark == "rewardbench2"
    (rewardbench.check_v2_rows if v2 else rewardbench.check_v1_rows)(dataset)
    rows = rewardbench.as_model_inputs(dataset, benchmark, bool(getattr(tokenizer, "chat_template", None)))
    tokenized, stats = data.tokenize_pairs(rows, tokenizer, max_length, length_policy)
    if stats.n_kept != stats.n_rows:
        raise ValueError(f"--benchmark {benchmark} scores every row, but {stats.n_dropped_too_long} rows are over "
                         f"--max-length {max_length}: raise it or pass --length-policy truncate_left")
    full = data.tokenize_pairs(rows, tokenizer, None)[0] if stats.n_truncated else tokenized  # lengths: whole sides
    device = next(model.parameters()).device
    subsets = list(dataset["subset"])
    if v2:
        rewards, metrics = ranking_rewards(model, tokenizer, tokenized.to_list(), batch_size, device)
        lengths = [[len(ids) for ids in row] for row in full["responses_ids"]]
        metrics["rewardbench2"] = rewardbench.v2_report(rewards, lengths, subsets, [str(i) for i in dataset["id"]],
                                                        list(dataset["num_correct"]))
        return metrics, stats
    chosen, rejected = rewards_for_pairs(model, tokenized.to_list(), pair_collator(tokenizer), batch_size, device)
    metrics = eval_metrics(chosen, rejected)
    lengths_chosen = [len(ids) for ids in full["chosen_ids"]]
    lengths_rejected = [len(ids) for ids in full["rejected_ids"]]
    metrics.update(pair_report(chosen, rejected, lengths_chosen, lengths_rejected))
    metrics["rewardbench"] = rewardbench.v1_report(chosen, rejected, lengths_chosen, lengths_rejected, subsets)
    return metrics, stats


def with_pair_ids(dataset):
    """The rows with data.PAIR_ID added: each row's `id` as JSON text, else its 0-based index in the data as loaded."""
    ids = dataset["id"] if "id" in dataset.column_names else range(len(dataset))
    return dataset.add_column(data.PAIR_ID, [json.dumps(pair_id, default=str) for pair_id in ids])


def write_predictions(path: str | Path, ids: list[str], chosen: Tensor, rejected: Tensor) -> None:
    """One JSON line per scored pair, {"id", "chosen_reward", "rejected_reward"} (null if not finite), atomically."""
    with atomic_path(Path(path)) as tmp, open(tmp, "w") as handle:
        for pair_id, reward_chosen, reward_rejected in zip(ids, chosen.tolist(), rejected.tolist(), strict=True):
            record = {"id": json.loads(pair_id), "chosen_reward": reward_chosen, "rejected_reward": reward_rejected}
            handle.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")


def encode_item(tokenizer, item: Any) -> list[int]:
    """Token ids of a text, a chat, or a (prompt, response) tuple, as training encodes one side (EOS included)."""
    prompt, response = item if isinstance(item, tuple) else (None, item)
    return encode.encode_text(tokenizer, prompt, response)


def longest_text(model, max_length: int | None) -> tuple[int | None, str]:
    """The most tokens a scored text may have, and its name for error messages: --max-length, or the model's
    position table when that is shorter (learned positions would fail the whole batch with an IndexError)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and (max_length is None or positions < max_length):
        return positions, f"the model's max_position_embeddings ({positions}; --max-length is {max_length})"
    return max_length, f"--max-length {max_length}"


def score_texts(model, tokenizer, items: list, max_length: int | None = None, batch_size: int = 8,
                packing: str = "auto") -> list[float]:
    """One reward per text (or chat, or (prompt, response) tuple), encoded exactly as training encoded each side.

    Any packing mode but none scores the texts padding-free (texts share no prompt).
    """
    sides = [encode_item(tokenizer, item) for item in items]
    limit, limit_name = longest_text(model, max_length)
    too_long = [i for i, ids in enumerate(sides) if limit and len(ids) > limit]
    if too_long:
        raise ValueError(f"texts {too_long} are longer than {limit_name} tokens")
    mode = resolve_packing(packing, model, lambda message: None)
    return score_token_ids(model, tokenizer.pad_token_id, sides, batch_size, mode)


@torch.no_grad()
def score_token_ids(model, pad_token_id: int, sides: list[list[int]], batch_size: int, mode: str) -> list[float]:
    """Rewards of encoded sides, batch_size at a time in the order given; mode is a resolved packing mode."""
    device = next(model.parameters()).device
    rewards = []
    for start in range(0, len(sides), batch_size):
        batch = sides[start : start + batch_size]
        if mode != "none":
            packed = pack_groups([[ids] for ids in batch], pad_token_id, False, is_encoder(model))
            rewards.extend(packed_rewards(model, packed, device).tolist())
            continue
        input_ids, attention_mask = encode.pad_sequences(batch, pad_token_id, "right")
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
        rewards.extend(logits.squeeze(-1).float().tolist())
    return rewards


def score_by_length(model, pad_token_id: int, sides: list[list[int]], batch_size: int, mode: str) -> list[float]:
    """score_token_ids over the sides sorted by length (less padding), the rewards given back in the sides' order."""
    order = sorted(range(len(sides)), key=lambda i: len(sides[i]))  # stable: the same batches on every run
    rewards = [0.0] * len(sides)
    for i, reward in zip(order, score_token_ids(model, pad_token_id, [sides[i] for i in order], batch_size, mode),
                         strict=True):
        rewards[i] = reward
    return rewards


@torch.no_grad()
def rewards_for_rows(model, rows, collator, batch_size: int, device, precision: str = "fp32") -> Tensor:
    """Every response's reward, row after row in each row's stored (best-first) order, as one CPU fp32 tensor."""
    was_training = model.training
    model.eval()
    pieces = []
    for start in range(0, len(rows), batch_size):
        batch = data.to_device(collator(rows[start : start + batch_size]), device)
        with autocast_context(precision, device):
            rewards = sequence_rewards(model, batch)
        row_major = torch.sort(batch["group"], stable=True).indices  # position-major -> row after row
        pieces.append(rewards[row_major].cpu())
    model.train(was_training)
    return torch.cat(pieces) if pieces else torch.empty(0)


def split_by_row(flat: Tensor, rows: list[dict[str, Any]]) -> list[Tensor]:
    """rewards_for_rows' flat tensor cut back into one tensor per row."""
    return list(torch.split(flat, [len(row["responses_ids"]) for row in rows]))


def evaluate_rows(model, rows, collator, batch_size: int, device, precision: str = "fp32") -> dict[str, Any]:
    """evaluate() for K-way rows: each rank scores its contiguous shard; rewards gathered in order."""
    mine, n_real = distributed.equal_shard(rows)
    flat = rewards_for_rows(model, mine, collator, batch_size, device, precision)
    n_real_responses = sum(len(row["responses_ids"]) for row in mine[:n_real])
    every = distributed.gather_cat(flat[:n_real_responses])
    return ranking_metrics(split_by_row(every, rows), [row["scores"] for row in rows])


def ranking_rewards(model, tokenizer, rows, batch_size: int, device) -> tuple[list[Tensor], dict[str, Any]]:
    """K-way rows scored unsharded: (each row's rewards, their ranking_metrics), as eval and --benchmark need."""
    collator = functools.partial(ranking.collate_groups, pad_token_id=tokenizer.pad_token_id)
    rewards = split_by_row(rewards_for_rows(model, rows, collator, batch_size, device), rows)
    return rewards, ranking_metrics(rewards, [row["scores"] for row in rows])


def evaluate_ranking_rows(model, tokenizer, rows, batch_size: int, device, report=None, log=None):
    """evaluate_dataset for K-way rows: (metrics, report files); the report plots every pair of responses
    with different scores as a (better, worse) pair."""
    rewards, metrics = ranking_rewards(model, tokenizer, rows, batch_size, device)
    if not report:
        return metrics, []
    better, worse, better_lengths, worse_lengths = [], [], [], []
    for row, row_rewards in zip(rows, rewards, strict=True):
        scores = torch.tensor(row["scores"])
        for i, j in zip(*ordered_pairs(torch.zeros_like(scores, dtype=torch.long), scores), strict=True):
            better.append(row_rewards[i])
            worse.append(row_rewards[j])
            better_lengths.append(len(row["responses_ids"][i]))
            worse_lengths.append(len(row["responses_ids"][j]))
    written = write_report(report, torch.stack(better), torch.stack(worse), better_lengths, worse_lengths, metrics,
                           log)
    return metrics, written


def evaluate(model, pairs, collator, batch_size: int, device, precision: str = "fp32",
             **packed: Any) -> dict[str, Any]:
    """Metrics over every eval pair (rewards concatenated first, so the means are exact, not batch means), with
    the length-only baselines and bootstrap intervals.

    Under torchrun each rank scores its contiguous shard and the rewards are gathered in order before the means.
    Shards are padded to equal length and the padding's rewards dropped: under FSDP every forward is a collective.
    """
    if ranking.is_ranking_rows(pairs):  # K-way rows: top-1, pairwise accuracy, Kendall's tau
        return evaluate_rows(model, pairs, collator, batch_size, device, precision)
    mine, n_real = distributed.equal_shard(pairs)
    chosen, rejected = rewards_for_pairs(model, mine, collator, batch_size, device, precision, **packed)
    chosen, rejected = distributed.gather_cat(chosen[:n_real]), distributed.gather_cat(rejected[:n_real])
    # the length-only baselines and intervals of `lora-rm eval`, on the sides as scored (after any truncate_left cut)
    lengths = [len(pair["chosen_ids"]) for pair in pairs], [len(pair["rejected_ids"]) for pair in pairs]
    return {**eval_metrics(chosen, rejected), **pair_report(chosen, rejected, *lengths)}
