"""Stopping a run gone wrong: a loss, gradient or weight that is not finite, or a model collapsed to constant
rewards or zero gradients. The error says what happened, which learning rate did it, and which checkpoint is still
good; checkpoints saved with the bad weights are set aside (renamed diverged-step-N), never resumed from.

The checks run on the device: each step adds a few flags (0-dim tensors) and nothing is read back until check()
(before a step's update, on steps that log or save) or check_weights() (after the update, before a save). A GPU
then never waits on the host between those points (each read, .item() or bool(), drains its queue). Every rank
reads the same flags, summed over ranks, so all of them stop at the same step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed
from .checkpoint import list_checkpoints, set_aside_checkpoints
from .optim import trained_parameters

COLLAPSE_STEPS = 5  # this many consecutive optimizer steps with constant rewards or a zero gradient norm: collapsed


class TrainingDiverged(RuntimeError):
    """A loss, gradient or weight became NaN or inf, or the model collapsed; only good checkpoints are kept."""


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor: every element of every tensor is finite (two foreach kernels, no host read).

    max |t| rather than a norm: a norm of huge but finite weights overflows to inf; NaN propagates through max.
    """
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # FSDP shards: each rank its own
    local = [t.detach() for t in local if t.numel()]
    if not local:
        return torch.ones((), dtype=torch.bool)
    return torch.stack(torch._foreach_max(torch._foreach_abs(local))).isfinite().all()


@dataclass
class Health:
    """The checks of one run; each raises TrainingDiverged.

    Steps count from 1, as log.jsonl does: step s's forward runs on the weights after s - 1 updates (checkpoint
    step-(s-1)'s) and its update makes checkpoint step-s's weights.
    """

    peak_lr: float  # --lr, named in the message
    checkpoints: Path
    lr_of_update: Callable[[int], float]  # the learning rate of step s's update (the logged one, group 0)
    scaled: bool = False  # fp16's scaler skips a step with a non-finite gradient norm itself
    # (step, [loss summed over micro-batches, gradient norm, max - min of its rewards]) still on the device
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    weights_finite: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (step, finite after its update)
    collapsed_since: int | None = None  # the first step of a run of collapsed steps

    def record(self, step: int, losses: list[torch.Tensor], grad_norm: torch.Tensor,
               step_rewards: list[torch.Tensor]) -> None:
        """Keep a step's flags on the device; nothing is read here."""
        every = torch.cat(step_rewards).detach().float()
        spread = every.max() - every.min() if every.numel() else every.new_zeros(())
        loss_sum = torch.stack([loss.detach().float() for loss in losses]).sum()  # NaN or inf if any loss was
        self.pending.append((step, torch.stack([loss_sum, grad_norm.detach().float(), spread])))

    def check(self, now: int) -> None:
        """Read every pending step's flags at once (one read, one sum over ranks) and stop at the first bad one;
        `now` is the step about to update."""
        if not self.pending:
            return
        steps, flags = zip(*self.pending, strict=True)
        self.pending = []
        table = torch.stack(flags).cpu()  # (steps, 3): the one read
        local_loss_bad = table[:, 0].isfinite().logical_not().double()
        summed = distributed.sum_over_ranks(torch.cat([local_loss_bad, table[:, 2].double()]).tolist())
        loss_bad_ranks, spreads = summed[: len(steps)], summed[len(steps) :]  # a spread is 0 only if 0 on all
        for step, (loss_sum, grad_norm, _), bad_ranks, spread in zip(steps, table.tolist(), loss_bad_ranks, spreads,
                                                                     strict=True):
            self.check_step(step, loss_sum, grad_norm, bad_ranks > 0, spread, now)

    def check_step(self, step: int, loss_sum: float, grad_norm: float, loss_bad: bool, spread: float,
                   now: int) -> None:
        """One step's flags on the host, in the order the step ran them: loss, gradient norm, collapse."""
        outcome = ("nothing was updated with it" if step == now else
                   f"the steps up to {now} ran on with it before it was read (health is read on steps that log or "
                   "save)")
        if loss_bad:  # on this rank or another: every rank stops at the same step
            value = loss_sum if not math.isfinite(loss_sum) else "not finite on another process"
            # the weights after step - 1 updates (checkpoint step-(step-1)) gave this loss
            raise self.diverged(f"loss is {value} at step {step}; {outcome}",
                                self.lr_of_update(step - 1), bad_from=step - 1)
        if not math.isfinite(grad_norm) and not self.scaled:  # fp16's scaler skips such a step itself
            raise self.diverged(f"the gradient norm is {grad_norm} at step {step}; {outcome}",
                                self.lr_of_update(step - 1), bad_from=step - 1)
        if grad_norm != 0.0 and spread != 0.0:
            self.collapsed_since = None
            return
        if self.collapsed_since is None:
            self.collapsed_since = step
        if step - self.collapsed_since + 1 >= COLLAPSE_STEPS:
            raise self.diverged(
                f"the model collapsed: every reward the same or a zero gradient norm for {COLLAPSE_STEPS} "
                f"consecutive steps ({self.collapsed_since}-{step}), so training cannot move it",
                self.lr_of_update(self.collapsed_since - 1), bad_from=self.collapsed_since - 1,
            )

    @contextlib.contextmanager
    def guard_update(self, step: int, lr: float, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Around the optimizer step: an overflow in it stops the run; whether it left NaN/inf weights is kept on
        the device for check_weights."""
        try:
            yield
        except RuntimeError as error:  # AdamW's step size lr / (1 - beta1^t) overflows float32 at a huge lr
            if "overflow" not in str(error):
                raise
            # the update of `step` made the weights of checkpoint step-N, N = step: that one is bad, the rest good
            raise self.diverged(f"the update of step {step} overflowed ({error})", lr, bad_from=step) from error
        self.weights_finite.append((step, all_finite(trained_parameters(optimizer))))

    def check_weights(self) -> None:
        """Read whether each update since the last read left finite weights (one read); stop at the first that did
        not."""
        if not self.weights_finite:
            return
        steps, flags = zip(*self.weights_finite, strict=True)
        self.weights_finite = []
        bad_ranks = distributed.sum_over_ranks(torch.stack(flags).logical_not().double().cpu().tolist())
        for step, bad in zip(steps, bad_ranks, strict=True):
            if bad:
                raise self.diverged(f"the update of step {step} left NaN or inf in the adapter or head",
                                    self.lr_of_update(step), bad_from=step)

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
