"""The Bradley-Terry loss and preference metrics: pure functions of reward tensors, no model.

A reward model scores each side of a pair; P(chosen beats rejected) = sigmoid(r_c - r_r - margin), so the
loss is its negative log-likelihood. Everything here equals TRL 1.16's RewardTrainer.compute_loss, in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
