"""Stopping a run gone wrong: a loss, gradient or weight that is not finite, or a model collapsed to constant
rewards or zero gradients. The error says what happened, which learning rate did it, and which checkpoint is still
good; checkpoints saved with the bad weights are set aside (renamed diverged-step-N), never resumed from.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed
from .checkpoint import list_checkpoints, set_aside_checkpoints

COLLAPSE_STEPS = 5  # this many consecutive optimizer steps with constant rewards or a zero gradient norm: collapsed


class TrainingDiverged(RuntimeError):
    """A loss, gradient or weight became NaN or inf, or the model collapsed; only good checkpoints are kept."""


def weights_are_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every trainable weight (adapter and head) is finite on every rank; the same answer on each."""
    local = [p.to_local() if hasattr(p, "to_local") else p for g in optimizer.param_groups for p in g["params"]]
    finite = torch.stack([t.detach().isfinite().all() for t in local]).all().item()
    return distributed.sum_over_ranks([float(not finite)])[0] == 0


def reward_spread(rewards: list[torch.Tensor]) -> float:
    """max - min of a step's rewards, summed over ranks: 0 only when each rank gave every text the same reward."""
    every = torch.cat(rewards).float()
    return distributed.sum_over_ranks([(every.max() - every.min()).item()])[0]


@dataclass
class Health:
    """The checks of one run; each raises TrainingDiverged. Weights after N updates are checkpoint step-N's."""

    peak_lr: float  # --lr, named in the message
    checkpoints: Path
    previous_lr: float  # the learning rate of the update that made the current weights
    collapsed_since: int | None = None  # the first step of a run of collapsed steps
    collapse_lr: float = 0.0  # the learning rate of the update before it

    def check_loss(self, loss: torch.Tensor, step: int) -> None:
        if not torch.isfinite(loss):
            # the weights after `step` updates (checkpoint step-N, N = step) gave this loss
            raise self.diverged(f"loss is {loss.item()} at step {step}; nothing was updated with it",
                                self.previous_lr, bad_from=step)

    def check_gradients(self, grad_norm: float, step_rewards: list[torch.Tensor], step: int, scaled: bool) -> None:
        """Before the update: a non-finite gradient norm (fp16's scaler skips such a step itself), or collapse."""
        if not math.isfinite(grad_norm) and not scaled:
            raise self.diverged(f"the gradient norm is {grad_norm} at step {step}; nothing was updated with it",
                                self.previous_lr, bad_from=step)
        if grad_norm != 0.0 and reward_spread(step_rewards) != 0.0:
            self.collapsed_since = None
            return
        if self.collapsed_since is None:
            self.collapsed_since, self.collapse_lr = step, self.previous_lr
        if step - self.collapsed_since + 1 >= COLLAPSE_STEPS:
            raise self.diverged(
                f"the model collapsed: every reward the same or a zero gradient norm for {COLLAPSE_STEPS} "
                f"consecutive steps ({self.collapsed_since}-{step}), so training cannot move it", self.collapse_lr,
                bad_from=self.collapsed_since,
            )

    @contextlib.contextmanager
    def guard_update(self, step: int, lr: float, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Around the optimizer step: an overflow in it, or NaN/inf weights after it, stop the run."""
        try:
            yield
        except RuntimeError as error:  # AdamW's step size lr / (1 - beta1^t) overflows float32 at a huge lr
            if "overflow" not in str(error):
                raise
            # the update of `step` made the weights of checkpoint step-(step + 1): that one is bad, the rest good
            raise self.diverged(f"the update of step {step} overflowed ({error})", lr, bad_from=step + 1) from error
        if not weights_are_finite(optimizer):
            raise self.diverged(f"the update of step {step} left NaN or inf in the adapter or head", lr,
                                bad_from=step + 1)
        self.previous_lr = lr

    def diverged(self, what: str, lr: float, bad_from: int) -> TrainingDiverged:
        """The error: what happened, the learning rate that did it, the latest good checkpoint.

        Checkpoints of step >= bad_from hold the weights that went wrong: renamed diverged-step-N (kept to look
        at, never resumed from).
        """
        moved = set_aside_checkpoints(self.checkpoints, bad_from) if distributed.is_main() else []
        good = list_checkpoints(self.checkpoints)
        parts = [f"{what}; the learning rate of the update that led here was {lr:g} (peak --lr {self.peak_lr:g})."]
        if moved:
            parts.append(f"Set aside as not good (saved with those weights): {', '.join(p.name for p in moved)}.")
        parts.append(f"The latest good checkpoint is {good[-1]}." if good else "There is no good checkpoint.")
        parts.append("Lower --lr, use fp32/bf16, or check the data.")
        return TrainingDiverged(" ".join(parts))
