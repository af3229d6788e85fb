"""The reward report: metrics.json plus a few PNGs that show *how* a reward model ranks pairs, not just how often.

- rewards_hist.png: chosen and rejected rewards on shared bins. Two well-separated humps mean the model tells the
  sides apart; heavily overlapping ones mean weak separation even when accuracy looks fine (small margins).
- accuracy_by_length.png: accuracy per quantile bucket of the mean pair length. Accuracy falling in the long
  buckets means the model loses track of long responses (or they were truncated); a bucket near 0.5 is chance.
- reward_vs_length.png: reward against response length for each side, with a least-squares line and Pearson r.
  Lines that rise with length for chosen *and* rejected alike mean length bias, the classic reward-model failure:
  the model pays for tokens, not for preference. metrics.json carries the same story as numbers:
  length_correlation, and accuracy_longer_chosen vs accuracy_shorter_chosen (a length-biased model is right when
  the chosen side is longer and wrong when it is shorter).
- subset_accuracy.png (when the data has a `subset` column): per subset and their macro average, the model's
  accuracy beside what "the longer response wins" and "the shorter response wins" score on the same pairs, with
  95% bootstrap intervals (lora_rm/eval_stats.py). A subset where a length rule matches or beats the model says
  little about the model: length alone solves it.
- training_curves.png (with a training log.jsonl): loss and train/eval accuracy against step. Train accuracy
  climbing while eval accuracy stalls or drops is overfitting.

Lengths are token counts of each side, a proxy for response length; a prompt shared by both sides shifts both
equally, so which side is longer does not change.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor

from .atomic import write_json
from .eval_stats import accuracy_where, finite_or_none, length_metrics
from .loss import preference_metrics
from .run_log import read_log

FIGSIZE = (6, 4)
DPI = 100
COLORS = {"chosen": "tab:blue", "rejected": "tab:orange"}


def length_buckets(lengths: Tensor, n_buckets: int = 5) -> Tensor:
    """Bucket index of each length by quantile edges; tied lengths share a bucket, so there may be fewer buckets."""
    edges = torch.unique(torch.quantile(lengths, torch.linspace(0, 1, n_buckets + 1, dtype=lengths.dtype)))
    return torch.bucketize(lengths, edges[1:-1], right=True)


def fit_line(x: Tensor, y: Tensor) -> tuple[float, float] | None:
    """Least-squares slope and intercept of y on x; None when x is constant."""
    x, y = x.double(), y.double()
    dx = x - x.mean()
    if dx.square().sum() == 0:
        return None
    slope = (dx * (y - y.mean())).sum() / dx.square().sum()
    return slope.item(), (y.mean() - slope * x.mean()).item()


def figure_class():
    """matplotlib's Figure, imported here so that `import lora_rm.plots` works without matplotlib."""
    try:
        import matplotlib  # noqa: F401  (import the parent first: a cached matplotlib.figure would hide its absence)
    except ImportError as error:
        raise ImportError("the reward report needs matplotlib: pip install 'lora-rm[plot]'") from error
    from matplotlib.figure import Figure

    return Figure


def new_figure(ncols: int = 1):
    """A pyplot-free figure (saved with Agg): no backend switch in the caller's session, nothing left to close."""
    figure = figure_class()(figsize=(FIGSIZE[0] * ncols, FIGSIZE[1]), dpi=DPI, layout="constrained")
    return figure, figure.subplots(1, ncols)


def plot_histogram(path: Path, chosen: Tensor, rejected: Tensor) -> None:
    """Chosen and rejected rewards overlaid on shared bins, accuracy and mean margin in the title."""
    figure, ax = new_figure()
    bins = torch.histogram(torch.cat([chosen, rejected]).double(), bins=min(40, max(5, chosen.numel() // 5))).bin_edges
    for name, rewards in (("chosen", chosen), ("rejected", rejected)):
        ax.hist(rewards.numpy(), bins=bins.numpy(), alpha=0.55, color=COLORS[name], label=name)
    summary = preference_metrics(chosen, rejected)
    ax.set_title(f"Rewards: accuracy {summary['accuracy']:.3f}, mean margin {summary['mean_margin']:.3f}")
    ax.set_xlabel("reward")
    ax.set_ylabel("pairs")
    ax.legend()
    figure.savefig(path)


def plot_accuracy_by_length(path: Path, chosen: Tensor, rejected: Tensor, mean_lengths: Tensor) -> None:
    """Accuracy per quantile bucket of mean pair length, each bar labelled with its pair count."""
    figure, ax = new_figure()
    bucket = length_buckets(mean_lengths)
    labels, accuracies, counts = [], [], []
    for index in bucket.unique().tolist():
        members = bucket == index
        labels.append(f"{mean_lengths[members].min():.0f}-{mean_lengths[members].max():.0f}")
        accuracies.append(accuracy_where(chosen, rejected, members))
        counts.append(int(members.sum()))
    bars = ax.bar(labels, accuracies, color="tab:green", alpha=0.8)
    ax.bar_label(bars, labels=[f"n={count}" for count in counts], padding=2, fontsize=8)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_ylim(0, 1.12)  # head room for the n= labels above a bar at 1.0
    ax.set_title("Accuracy by length")
    ax.set_xlabel("mean pair length (tokens), quantile buckets")
    ax.set_ylabel("accuracy")
    ax.legend(loc="lower left")
    figure.savefig(path)


def plot_reward_vs_length(path: Path, sides: dict[str, tuple[Tensor, Tensor]], correlations: dict) -> None:
    """Reward against length per side, with a least-squares line and Pearson r each."""
    figure, ax = new_figure()
    for name, (rewards, lengths) in sides.items():
        r = correlations[f"length_correlation_{name}"]
        label = f"{name} (r = {r:+.2f})" if r is not None else f"{name} (r undefined)"
        ax.scatter(lengths.numpy(), rewards.numpy(), s=10, alpha=0.45, color=COLORS[name], label=label)
        line = fit_line(lengths, rewards)
        if line is not None:
            xs = torch.stack([lengths.min(), lengths.max()]).double()
            ax.plot(xs.numpy(), (line[0] * xs + line[1]).numpy(), color=COLORS[name], linewidth=2)
    correlation = correlations["length_correlation"]
    overall = f"{correlation:+.2f}" if correlation is not None else "undefined"
    ax.set_title(f"Reward vs length (both sides: r = {overall})")
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("reward")
    ax.legend()
    figure.savefig(path)


SUBSET_BARS = (("accuracy", "model", "tab:green"), ("longer_wins_accuracy", "longer wins", "tab:purple"),
               ("shorter_wins_accuracy", "shorter wins", "tab:gray"))


def plot_subsets(path: Path, per_subset: dict[str, dict], macro: dict) -> None:
    """Grouped bars per subset (and the macro average): the model, then the two length-only rules, with intervals."""
    groups = {**per_subset, "macro average": macro}
    figure, ax = new_figure()
    figure.set_figwidth(max(FIGSIZE[0], 1.2 * len(groups) + 2))
    width = 0.8 / len(SUBSET_BARS)
    for offset, (key, label, color) in enumerate(SUBSET_BARS):
        xs = [i + (offset - 1) * width for i in range(len(groups))]
        values = [entry[key] for entry in groups.values()]
        below = [value - entry[f"{key}_ci"][0] for value, entry in zip(values, groups.values(), strict=True)]
        above = [entry[f"{key}_ci"][1] - value for value, entry in zip(values, groups.values(), strict=True)]
        ax.bar(xs, values, width, yerr=[below, above], capsize=2, color=color, alpha=0.85, label=label)
    names = [f"{name}\n(n={entry['n_pairs']})" if "n_pairs" in entry else name for name, entry in groups.items()]
    ax.set_xticks(range(len(groups)), names, fontsize=8)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1.2)  # head room for the legend above bars at 1.0
    ax.set_title("Accuracy per subset: the model vs length alone")
    ax.set_ylabel("accuracy (95% bootstrap interval)")
    ax.legend(loc="upper center", ncols=len(SUBSET_BARS), fontsize=8)
    figure.savefig(path)


def curve(records: list[dict], key: str) -> list[tuple[float, float]]:
    """(step, value) of every record that has both as numbers; train and eval lines carry different keys."""
    pairs = [(record.get("step"), record.get(key)) for record in records]
    return [pair for pair in pairs if all(type(value) in (int, float) for value in pair)]  # type(): bools are ints


def plot_training_curves(path: Path, records: list[dict]) -> None:
    """Loss and train/eval accuracy against step, two panels side by side."""
    figure, (loss_ax, accuracy_ax) = new_figure(ncols=2)
    # eval_accuracy, or eval_<name>_accuracy for each of several --eval-dataset
    eval_keys = sorted({key for record in records for key in record if re.fullmatch(r"eval_(.+_)?accuracy", key)})
    for ax, key, label in (
        (loss_ax, "loss", "train loss"),
        (accuracy_ax, "accuracy", "train accuracy"),
        *[(accuracy_ax, key, key.removesuffix("_accuracy").replace("_", " ", 1) + " accuracy") for key in eval_keys],
    ):
        points = curve(records, key)
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if key.startswith("eval") else None, markersize=4, label=label)
    for ax, title in ((loss_ax, "Training loss"), (accuracy_ax, "Accuracy")):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.has_data():
            ax.legend()
    figure.savefig(path)


def as_vector(name: str, values: list[int] | Tensor, n_pairs: int) -> Tensor:
    """A flat fp32 CPU copy of one input, checked to have one value per pair."""
    vector = torch.as_tensor(values).detach().float().cpu().flatten()
    if vector.numel() != n_pairs:
        raise ValueError(f"{name} has {vector.numel()} values but rewards_chosen has {n_pairs} pairs")
    return vector


def write_report(
    folder: str | os.PathLike,
    rewards_chosen: Tensor,
    rewards_rejected: Tensor,
    lengths_chosen: list[int] | Tensor,
    lengths_rejected: list[int] | Tensor,
    metrics: dict,
    log_path: str | os.PathLike | None = None,
) -> list[Path]:
    """Write metrics.json and the report PNGs into folder so a reader can see separation and length bias."""
    n_pairs = torch.as_tensor(rewards_chosen).numel()
    if n_pairs == 0:
        raise ValueError("the reward report needs at least one pair")
    chosen = as_vector("rewards_chosen", rewards_chosen, n_pairs)
    rejected = as_vector("rewards_rejected", rewards_rejected, n_pairs)
    length_c = as_vector("lengths_chosen", lengths_chosen, n_pairs)
    length_r = as_vector("lengths_rejected", lengths_rejected, n_pairs)
    if not torch.isfinite(torch.cat([chosen, rejected])).all():
        raise ValueError("rewards contain NaN or inf (an overflow in half precision?); the report cannot plot them")
    figure_class()  # fail on a missing matplotlib before writing anything
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    extra = length_metrics(chosen, rejected, length_c, length_r)
    paths = [folder / "metrics.json"]
    write_json(paths[0], finite_or_none({**metrics, **extra}))  # rewards are finite; a metric may still be NaN
    paths.append(folder / "rewards_hist.png")
    plot_histogram(paths[-1], chosen, rejected)
    paths.append(folder / "accuracy_by_length.png")
    plot_accuracy_by_length(paths[-1], chosen, rejected, (length_c + length_r) / 2)
    paths.append(folder / "reward_vs_length.png")
    sides = {"chosen": (chosen, length_c), "rejected": (rejected, length_r)}
    plot_reward_vs_length(paths[-1], sides, extra)
    if metrics.get("per_subset"):
        paths.append(folder / "subset_accuracy.png")
        plot_subsets(paths[-1], metrics["per_subset"], metrics["macro_average"])
    if log_path is not None:
        paths.append(folder / "training_curves.png")
        plot_training_curves(paths[-1], read_log(log_path))
    return paths
