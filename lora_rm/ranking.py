"""Rankings of K answers: the two K-way row shapes, their tokenization, losses and metrics.

A K-way row is a group of K >= 2 responses to one prompt, each with a score (higher is better; equal scores mean
no preference between those two). Two shapes beside the pairs of data.py, in every text form (implicit, explicit
`prompt`, conversational):
  responses  `responses` (K texts or message lists) and `scores` (K numbers)
  lists      RewardBench 2's `chosen` and `rejected` as lists: every chosen (score 1) above every rejected (score 0)

Each response is tokenized as a pair's side is (encode.encode_text, TRL's rule) and the group is stored best first
(a stable sort by score), so a K = 2 row is laid out exactly as the pair it describes. A micro-batch stacks every
sequence of its rows into one padded forward, position-major (the best response of every row, then the second,
...): with K = 2 that is collate_pairs' chosen-then-rejected layout, so both losses below reduce to
loss.bradley_terry_loss bit for bit. The losses read only `group` (the row of each sequence) and `scores`, so
another layout (a shared prompt) needs no other change.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import Tensor, nn

from . import distributed, encode
from .config import RANKING_LOSSES
from .data_files import ROW_SOURCE
from .loss import preference_metrics, reward_stats
from .model_io import autocast_context

RESPONSES, LISTS = "responses", "lists"  # the two K-way row shapes


def ranking_shape(dataset: Dataset) -> str | None:
    """'responses', 'lists' (chosen and rejected hold lists of responses) or None for pair rows."""
    columns = set(dataset.column_names)
    if "responses" in columns:
        if "scores" not in columns:
            raise ValueError(f"K-way rows with `responses` need a `scores` column; the data has {sorted(columns)}")
        return RESPONSES
    if "chosen" not in columns or "rejected" not in columns:
        return None
    first = next((v for v in dataset["chosen"] if isinstance(v, str) or (isinstance(v, list) and v)), None)
    if isinstance(first, list) and isinstance(first[0], (str, list)):  # a list of texts or of message lists
        return LISTS
    return None


def is_ranking_rows(rows: list[dict[str, Any]]) -> bool:
    """Whether tokenized rows are K-way groups (tokenize_rankings) rather than pairs."""
    return bool(rows) and "responses_ids" in rows[0]


def _responses_and_scores(row: dict[str, Any], shape: str) -> tuple[Any, Any, str | None]:
    """(responses, scores, problem) of one row in either shape; problem is None when the row can be used."""
    if shape == LISTS:
        for name in ("chosen", "rejected"):
            if not isinstance(row[name], list) or not row[name]:
                return None, None, f"{name} is not a non-empty list of responses"
        return row["chosen"] + row["rejected"], [1.0] * len(row["chosen"]) + [0.0] * len(row["rejected"]), None
    responses, scores = row["responses"], row["scores"]
    if not isinstance(responses, list) or len(responses) < 2:
        return None, None, "responses is not a list of at least 2 responses"
    if not isinstance(scores, list) or len(scores) != len(responses):
        found = f"{len(scores)} scores" if isinstance(scores, list) else f"scores of type {type(scores).__name__}"
        return None, None, f"{len(responses)} responses but {found}"
    for k, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            return None, None, f"scores[{k}] is not a finite number: {score!r}"
    if len(set(scores)) == 1:
        return None, None, "all scores are equal: the row prefers no response"
    return responses, [float(score) for score in scores], None


def _row_problem(row: dict[str, Any], shape: str, conversational: bool) -> str | None:
    """Why a K-way row cannot be used, or None (data._row_problem's rules, per response)."""
    if "margin" in row and not (isinstance(row["margin"], (int, float)) and math.isfinite(row["margin"])):
        return f"margin is not a finite number: {row['margin']!r}"
    responses, scores, problem = _responses_and_scores(row, shape)
    if problem:
        return problem
    if "prompt" in row and (problem := encode.side_problem("prompt", row["prompt"], conversational)):
        return problem
    name = "responses" if shape == RESPONSES else "chosen + rejected"
    for k, response in enumerate(responses):
        if problem := encode.side_problem(f"{name}[{k}]", response, conversational):
            return problem
    return None


def _identical_but_scored_apart(sides: list, scores: list[float]) -> tuple[int, int] | None:
    """The first two positions holding the same response with different scores: a row that contradicts itself."""
    for i in range(len(sides)):
        for j in range(i + 1, len(sides)):
            if sides[i] == sides[j] and scores[i] != scores[j]:
                return i, j
    return None


def _encode_ranking_row(
    row: dict[str, Any], index: int, tokenizer, shape: str, conversational: bool, max_length: int | None,
    length_policy: str, skip_bad_rows: bool,
) -> dict[str, Any]:
    """One K-way row to responses_ids (best first), scores, length (the longest) and status (data._encode_row's)."""
    problem = _row_problem(row, shape, conversational)
    if problem is None:
        responses, scores, _ = _responses_and_scores(row, shape)
        ids = [encode.encode_text(tokenizer, row.get("prompt"), response) for response in responses]
        if same := _identical_but_scored_apart(responses, scores):
            problem = f"responses {same[0]} and {same[1]} are identical but scored differently"
        elif same := _identical_but_scored_apart(ids, scores):
            problem = f"responses {same[0]} and {same[1]} tokenize to the same ids but are scored differently"
    if problem is not None:
        if not skip_bad_rows:
            where = row.get(ROW_SOURCE) or f"row {index}"
            raise ValueError(f"{where}: {problem} (pass --skip-bad-rows to skip such rows)")
        return {"responses_ids": [], "scores": [], "length": 0, "status": "bad"}
    best_first = sorted(range(len(ids)), key=lambda k: -scores[k])  # stable: equal scores keep their order
    ids, scores = [ids[k] for k in best_first], [scores[k] for k in best_first]
    status = "ok"
    if max_length is not None and max(len(side) for side in ids) > max_length:
        if length_policy == "drop":
            status = "too_long"
        else:  # as pairs: keep the end of each response, where the reward is read
            status, ids = "truncated", [side[-max_length:] for side in ids]
    return {"responses_ids": ids, "scores": scores, "length": max(len(side) for side in ids), "status": status}


def tokenize_rankings(
    dataset: Dataset, tokenizer, max_length: int | None = None, length_policy: str = "drop",
    skip_bad_rows: bool = False,
) -> tuple[Dataset, encode.DataStats]:
    """data.tokenize_pairs for K-way rows: columns responses_ids, scores, length and margin if any.

    A row is dropped (or each response cut from the left) when any of its responses is over max_length.
    """
    shape = ranking_shape(dataset)
    column = "responses" if shape == RESPONSES else "chosen"
    first = next((v for v in dataset[column] if isinstance(v, list) and v), [None])
    conversational = encode.is_messages(first[0])
    sample = dataset.select(range(min(encode.UNK_CHECK_PAIRS, len(dataset))))
    ids = [
        token
        for row in sample
        if _row_problem(row, shape, conversational) is None
        for response in _responses_and_scores(row, shape)[0]
        for token in encode.encode_text(tokenizer, row.get("prompt"), response)
    ]
    encode.check_unknown_share(ids, len(sample), tokenizer, "K-way rows")
    kwargs = dict(tokenizer=tokenizer, shape=shape, conversational=conversational, max_length=max_length,
                  length_policy=length_policy, skip_bad_rows=skip_bad_rows)
    encoded = dataset.map(
        _encode_ranking_row, fn_kwargs=kwargs, with_indices=True, keep_in_memory=True, desc="Tokenizing K-way rows",
        remove_columns=[c for c in dataset.column_names if c != "margin"],
    )
    statuses = encoded["status"]
    counts = Counter(statuses)
    kept = [i for i, status in enumerate(statuses) if status in ("ok", "truncated")]
    stats = encode.DataStats(n_rows=len(dataset), n_kept=len(kept), n_dropped_too_long=counts["too_long"],
                           n_truncated=counts["truncated"], n_bad_skipped=counts["bad"])
    return encoded.select(kept).remove_columns("status"), stats


def collate_groups(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, Tensor]:
    """Every response of every row in one right-padded batch, position-major; `group` names each sequence's row.

    Position-major (the best of every row, then the second of every row that has one, ...) makes a batch of
    K = 2 rows the very batch collate_pairs makes of the same pairs.
    """
    order = [(b, k) for k in range(max(len(r["responses_ids"]) for r in rows))
             for b, row in enumerate(rows) if k < len(row["responses_ids"])]
    sequences = [rows[b]["responses_ids"][k] for b, k in order]
    input_ids, attention_mask = encode.pad_sequences(sequences, pad_token_id, "right")  # (N, L) each
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "group": torch.tensor([b for b, _ in order], dtype=torch.long),  # (N,)
        "scores": torch.tensor([float(rows[b]["scores"][k]) for b, k in order], dtype=torch.float32),  # (N,)
    }
    if "margin" in rows[0]:
        batch["margin"] = torch.tensor([float(row["margin"]) for row in rows], dtype=torch.float32)  # (B,)
    return batch


def ordered_pairs(group: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """(better, worse) sequence indices of every pair within a row whose scores differ, ordered by `better`."""
    above = (group[:, None] == group[None, :]) & (scores[:, None] > scores[None, :])  # (N, N)
    better, worse = above.nonzero(as_tuple=True)
    return better, worse


def _in_row(rows: Tensor, n_rows: int) -> Tensor:
    """(n_rows, n) mask: element k belongs to row b. Dense sums over it are deterministic on every device, where
    CUDA's index_add and bincount are not (torch.use_deterministic_algorithms refuses bincount)."""
    return rows[None, :] == torch.arange(n_rows, device=rows.device)[:, None]


def _per_row_sum(values: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    return torch.where(_in_row(rows, n_rows), values[None, :], 0.0).sum(dim=1)  # adding zeros is exact


def _per_row_count(rows: Tensor, n_rows: int) -> Tensor:
    return _in_row(rows, n_rows).sum(dim=1).float()


def _centering(rewards: Tensor, group: Tensor, n_rows: int) -> Tensor:
    """TRL's centering term mean((r_c + r_r)^2) generalised to mean over rows of (2 * row mean reward)^2."""
    sizes = _per_row_count(group, n_rows)
    return torch.mean((_per_row_sum(rewards, group, n_rows) * (2 / sizes)) ** 2)  # 2/2 = 1: exact at K = 2


def all_pairs_loss(
    rewards: Tensor, group: Tensor, scores: Tensor, margin: Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> Tensor:
    """Bradley-Terry over every pair of a row with different scores: mean over the row's pairs, then over rows.

    Each row weighs as much as a pair row does (InstructGPT's 1 / C(K, 2) weighting); a row's `margin` is
    subtracted from each of its pairs' reward differences.
    """
    rewards = rewards.float()
    n_rows = int(group.max()) + 1
    better, worse = ordered_pairs(group, scores)
    difference = rewards[better] - rewards[worse]
    if margin is not None:
        difference = difference - margin.to(difference.device, torch.float32)[group[better]]
    rows = group[better]
    loss = (_per_row_sum(-F.logsigmoid(difference), rows, n_rows) / _per_row_count(rows, n_rows)).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * _centering(rewards, group, n_rows)
    return loss


def plackett_luce_loss(
    rewards: Tensor, group: Tensor, scores: Tensor, center_rewards_coefficient: float | None = None
) -> Tensor:
    """Listwise: -log P(the row's ranking) under Plackett-Luce, summed over positions, averaged over rows.

    Each response is picked first among itself and every response scored strictly below it:
    log P_i = r_i - log(exp(r_i) + sum_below exp(r_j)) = logsigmoid(r_i - logsumexp_below r_j). Ties are not
    ordered: tied responses do not compete with each other (with distinct scores this is exactly Plackett-Luce).
    """
    rewards = rewards.float()
    n_rows = int(group.max()) + 1
    below = (group[:, None] == group[None, :]) & (scores[:, None] > scores[None, :])  # (N, N): j below i
    picked = below.any(dim=1)  # responses with something below them; the last of a row adds log 1 = 0
    competitors = rewards[None, :].expand_as(below).masked_fill(~below, -math.inf)[picked]
    log_p = F.logsigmoid(rewards[picked] - torch.logsumexp(competitors, dim=1))
    loss = _per_row_sum(-log_p, group[picked], n_rows).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * _centering(rewards, group, n_rows)
    return loss


def ranking_loss(name: str, rewards: Tensor, batch: dict[str, Tensor],
                 center_rewards_coefficient: float | None = None) -> Tensor:
    """The --ranking-loss of a collated K-way batch."""
    if name == "all_pairs":
        return all_pairs_loss(rewards, batch["group"], batch["scores"], batch.get("margin"),
                              center_rewards_coefficient)
    if name == "plackett_luce":
        if batch.get("margin") is not None:
            raise ValueError("a margin column applies to --ranking-loss all_pairs only, not plackett_luce")
        return plackett_luce_loss(rewards, batch["group"], batch["scores"], center_rewards_coefficient)
    raise ValueError(f"ranking loss must be one of {RANKING_LOSSES}, got {name!r}")


def group_rewards(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """One forward over every sequence of the batch: (N,) fp32 rewards, read as scoring.batch_rewards reads them."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return logits.float().squeeze(-1)


def micro_batch_loss(forward_model: nn.Module, batch: dict[str, Tensor], config, device,
                     sync: bool) -> tuple[Tensor, Tensor, Tensor]:
    """train.micro_batch_loss for K-way rows: (loss, rewards of the better and of the worse side of each pair)."""
    batch = {key: tensor.to(device) for key, tensor in batch.items()}
    with distributed.no_sync(forward_model, sync), autocast_context(config.precision, device):
        rewards = group_rewards(forward_model, batch)
    loss = ranking_loss(config.ranking_loss, rewards, batch, config.center_rewards_coefficient)
    better, worse = ordered_pairs(batch["group"], batch["scores"])
    return loss, rewards[better].detach(), rewards[worse].detach()


@torch.no_grad()
def rewards_for_rows(model, rows, collator, batch_size: int, device, precision: str = "fp32") -> Tensor:
    """Every response's reward, row after row in each row's stored (best-first) order, as one CPU fp32 tensor."""
    was_training = model.training
    model.eval()
    pieces = []
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collator(rows[start : start + batch_size]).items()}
        with autocast_context(precision, device):
            rewards = group_rewards(model, batch)
        row_major = torch.sort(batch["group"], stable=True).indices  # position-major -> row after row
        pieces.append(rewards[row_major].cpu())
    model.train(was_training)
    return torch.cat(pieces) if pieces else torch.empty(0)


@torch.no_grad()
def ranking_metrics(rewards: list[Tensor], scores: list[list[float]]) -> dict[str, Any]:
    """Top-1 and pairwise accuracy, Kendall's tau and reward statistics of K-way rows; ties counted apart.

    top1_accuracy: every best-scored response strictly above every other (RewardBench 2's rule for its lists).
    pairwise_accuracy: over all pairs with different scores, pooled; `accuracy` is the same number, so tools
    written for pairs read it. kendall_tau: per row (concordant - discordant) / pairs with different scores, a pair
    with equal rewards counting 0; averaged over rows.
    """
    if not rewards:
        raise ValueError("ranking_metrics needs at least one row")
    top1_right = top1_tied = 0
    taus, better_rewards, worse_rewards = [], [], []
    for row_rewards, row_scores in zip(rewards, scores, strict=True):
        r, s = row_rewards.float(), torch.tensor(row_scores, dtype=torch.float32)
        best = s == s.max()
        lowest_best, highest_other = r[best].min(), r[~best].max()
        top1_right += int(lowest_best > highest_other)
        top1_tied += int(lowest_best == highest_other)
        better, worse = ordered_pairs(torch.zeros_like(s, dtype=torch.long), s)
        difference = r[better] - r[worse]
        taus.append(((difference > 0).sum() - (difference < 0).sum()).item() / len(difference))
        better_rewards.append(r[better])
        worse_rewards.append(r[worse])
    pairs = preference_metrics(torch.cat(better_rewards), torch.cat(worse_rewards))
    every_reward = torch.cat([r.float() for r in rewards])
    n_rows = len(rewards)
    return {
        "top1_accuracy": top1_right / n_rows,
        "top1_tie_rate": top1_tied / n_rows,
        "pairwise_accuracy": pairs["accuracy"],
        "pairwise_tie_rate": pairs["tie_rate"],
        "kendall_tau": sum(taus) / n_rows,
        "accuracy": pairs["accuracy"],
        "tie_rate": pairs["tie_rate"],
        "mean_margin": pairs["mean_margin"],
        "min_reward": every_reward.min().item(),
        "mean_reward": every_reward.mean().item(),
        "max_reward": every_reward.max().item(),
        "n_rows": n_rows,
        "n_pairs": len(torch.cat(better_rewards)),
        "n_responses": len(every_reward),
        "reward_stats": reward_stats(every_reward),
    }


def split_by_row(flat: Tensor, rows: list[dict[str, Any]]) -> list[Tensor]:
    """rewards_for_rows' flat tensor cut back into one tensor per row."""
    return list(torch.split(flat, [len(row["responses_ids"]) for row in rows]))


def evaluate_rows(model, rows, collator, batch_size: int, device, precision: str = "fp32") -> dict[str, Any]:
    """train.evaluate for K-way rows: each rank scores its contiguous shard; rewards gathered in order."""
    mine, n_real = distributed.equal_shard(rows)
    flat = rewards_for_rows(model, mine, collator, batch_size, device, precision)
    n_real_responses = sum(len(row["responses_ids"]) for row in mine[:n_real])
    every = distributed.gather_cat(flat[:n_real_responses])
    return ranking_metrics(split_by_row(every, rows), [row["scores"] for row in rows])


def evaluate_ranking_rows(model, tokenizer, rows, batch_size: int, device, report=None, log=None):
    """scoring.evaluate_dataset for K-way rows: (metrics, report files); the report plots every pair of responses
    with different scores as a (better, worse) pair."""
    collator = functools.partial(collate_groups, pad_token_id=tokenizer.pad_token_id)
    rewards = split_by_row(rewards_for_rows(model, rows, collator, batch_size, device), rows)
    metrics = ranking_metrics(rewards, [row["scores"] for row in rows])
    if not report:
        return metrics, []
    from .plots import write_report  # matplotlib is optional

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
