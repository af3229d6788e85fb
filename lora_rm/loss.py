"""Reward-model losses and metrics: pure functions of reward tensors, no model.

A reward model scores each response; P(a beats b) = sigmoid(r_a - r_b - margin), so a pair's loss is the negative
log-likelihood of the preferred order (Bradley-Terry). The losses of K-way rows sit beside it: all_pairs averages
Bradley-Terry over every pair of a row whose scores differ, plackett_luce scores the row's whole ranking. With
K = 2 both are bradley_terry_loss, bit for bit (a row has one pair, and one response below the best). Pairs equal
TRL 1.16's RewardTrainer.compute_loss, in fp32. The metrics below read the same rewards: accuracy, ties and
margins of pairs; top-1, pairwise accuracy and Kendall's tau of K-way rows; the reward mean/std for normalising.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import RANKING_LOSSES


def bradley_terry_loss(
    rewards_chosen: Tensor,
    rewards_rejected: Tensor,
    margin: Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> Tensor:
    """-log sigmoid(r_c - r_r - margin) averaged over pairs, in fp32 so bf16 rewards do not round the loss."""
    chosen, rejected = rewards_chosen.float(), rewards_rejected.float()
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen rewards {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ")
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin.to(difference.device, torch.float32)
    loss = -F.logsigmoid(difference).mean()
    if center_rewards_coefficient is not None:
        # TRL's centering term (Eisenstein et al. 2023): pulls the mean reward to 0 without changing ranks.
        loss = loss + center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    return loss


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
    center_rewards_coefficient: float | None = None, *, pairs: tuple[Tensor, Tensor] | None = None,
    n_rows: int | None = None,
) -> Tensor:
    """Bradley-Terry over every pair of a row with different scores: mean over the row's pairs, then over rows.

    Each row weighs as much as a pair row does (InstructGPT's 1 / C(K, 2) weighting); a row's `margin` is
    subtracted from each of its pairs' reward differences. `pairs` (ordered_pairs) and `n_rows`, when the
    collator has them, spare a GPU two waits: a value-sized nonzero() and a read of the row count.
    """
    rewards = rewards.float()
    n_rows = int(group.max()) + 1 if n_rows is None else n_rows
    better, worse = ordered_pairs(group, scores) if pairs is None else pairs
    difference = rewards[better] - rewards[worse]
    if margin is not None:
        difference = difference - margin.to(difference.device, torch.float32)[group[better]]
    rows = group[better]
    loss = (_per_row_sum(-F.logsigmoid(difference), rows, n_rows) / _per_row_count(rows, n_rows)).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * _centering(rewards, group, n_rows)
    return loss


def plackett_luce_loss(
    rewards: Tensor, group: Tensor, scores: Tensor, center_rewards_coefficient: float | None = None, *,
    n_rows: int | None = None,
) -> Tensor:
    """Listwise: -log P(the row's ranking) under Plackett-Luce, summed over positions, averaged over rows.

    Each response is picked first among itself and every response scored strictly below it:
    log P_i = r_i - log(exp(r_i) + sum_below exp(r_j)) = logsigmoid(r_i - logsumexp_below r_j). Ties are not
    ordered: tied responses do not compete with each other (with distinct scores this is exactly Plackett-Luce).
    """
    rewards = rewards.float()
    n_rows = int(group.max()) + 1 if n_rows is None else n_rows
    below = (group[:, None] == group[None, :]) & (scores[:, None] > scores[None, :])  # (N, N): j below i
    picked = below.any(dim=1)  # responses with something below them; the last of a row adds log 1 = 0
    competitors = rewards[None, :].expand_as(below).masked_fill(~below, -math.inf)
    # Masked with where, not picked out by x[picked] (a nonzero() the host waits for). A row with nothing below
    # gets finite stand-ins: logsumexp over only -inf has a NaN gradient, which where() would not stop.
    competitors = competitors.masked_fill(~picked[:, None], 0.0)
    log_p = torch.where(picked, F.logsigmoid(rewards - torch.logsumexp(competitors, dim=1)), 0.0)
    loss = _per_row_sum(-log_p, group, n_rows).mean()  # the zeros of unpicked responses add nothing
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * _centering(rewards, group, n_rows)
    return loss


def ranking_loss(name: str, rewards: Tensor, batch: dict[str, Tensor],
                 center_rewards_coefficient: float | None = None) -> Tensor:
    """The --ranking-loss of a collated K-way batch."""
    # collate_groups' pairs and row count (a shape, known on the host); else the losses work them out
    n_rows = batch["row_sizes"].numel() if "row_sizes" in batch else None
    pairs = (batch["better"], batch["worse"]) if "better" in batch else None
    if name == "all_pairs":
        return all_pairs_loss(rewards, batch["group"], batch["scores"], batch.get("margin"),
                              center_rewards_coefficient, pairs=pairs, n_rows=n_rows)
    if name == "plackett_luce":
        if batch.get("margin") is not None:
            raise ValueError("a margin column applies to --ranking-loss all_pairs only, not plackett_luce")
        return plackett_luce_loss(rewards, batch["group"], batch["scores"], center_rewards_coefficient,
                                  n_rows=n_rows)
    raise ValueError(f"ranking loss must be one of {RANKING_LOSSES}, got {name!r}")


def split_rewards(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Split the (2B, 1) or (2B,) model output of a collated batch into (chosen, rejected), each (B,)."""
    rewards = logits.squeeze(-1) if logits.dim() == 2 else logits
    if rewards.dim() != 1 or rewards.shape[0] % 2:
        raise ValueError(f"expected (2B,) or (2B, 1) rewards, got shape {tuple(logits.shape)}")
    chosen, rejected = torch.chunk(rewards, 2)
    return chosen, rejected


@torch.no_grad()
def preference_metrics(rewards_chosen: Tensor, rewards_rejected: Tensor) -> dict[str, float]:
    """Accuracy, ties, margins and reward range of a set of pairs, for logging and evaluation.

    For exact eval numbers pass the concatenated rewards of the whole set: averaging per-batch results would
    weigh a short last batch as much as a full one.
    """
    chosen, rejected = rewards_chosen.detach().float(), rewards_rejected.detach().float()
    if chosen.numel() == 0:
        raise ValueError("preference_metrics needs at least one pair")
    every_reward = torch.cat([chosen, rejected])
    return {
        # Strictly greater, as TRL: a model that scores both sides equal is not half right.
        "accuracy": (chosen > rejected).float().mean().item(),
        "tie_rate": (chosen == rejected).float().mean().item(),
        "mean_margin": (chosen - rejected).mean().item(),
        "mean_reward_chosen": chosen.mean().item(),
        "mean_reward_rejected": rejected.mean().item(),
        "min_reward": every_reward.min().item(),
        "mean_reward": every_reward.mean().item(),
        "max_reward": every_reward.max().item(),
    }


@torch.no_grad()
def reward_stats(rewards: Tensor) -> dict[str, float]:
    """Mean and standard deviation of rewards, saved beside the adapter so scores can be normalised later."""
    values = rewards.detach().float().flatten()
    if values.numel() < 2:
        raise ValueError("reward_stats needs at least two rewards to estimate a standard deviation")
    return {"mean": values.mean().item(), "std": values.std().item()}


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
