"""Evaluation the way the field reports it: accuracy per subset, beside what a length-only rule scores, with intervals.

A reward model's accuracy means little on a subset where length alone wins (RewardBench's alpacaeval subsets:
"pick the longer answer" scores 100% there). So every accuracy here comes with two baselines on the same pairs:
- longer_wins_accuracy: share of pairs whose chosen side has MORE tokens than the rejected side;
- shorter_wins_accuracy: share whose chosen side has FEWER tokens.
Equal lengths are right for neither rule and counted apart as length_tie_rate, as a reward tie is counted apart as
tie_rate and never as half right (accuracy is strict, chosen > rejected, as TRL). So longer + shorter + length ties
= 1. Lengths are the token counts of each side as scored (prompt included: a shared prompt shifts both alike).

Averages: macro_average is the unweighted mean over subsets. A section (--sections FILE: {section: [subsets]})
averages its subsets weighted by their number of pairs, as RewardBench's calculate_scores_per_section
(allenai/reward-bench, rewardbench/utils.py) does with its example counts; with the real counts that is the
accuracy of the section's pooled pairs. section_average is the unweighted mean over sections, RewardBench's
overall score (without its 0.5 weight on the prior sets). We weight by the pairs evaluated here; RewardBench uses
a fixed table (and upweights math-prm to 984 "to be equal to code").

Intervals: percentile bootstrap, 95%, BOOTSTRAP_RESAMPLES resamples, fixed seed. Resampling n pairs with replacement
and counting the right ones is exactly a Binomial(n, k/n) draw, so that is drawn directly (O(resamples), not
O(resamples x pairs)). The overall accuracy resamples all pairs; subsets, their macro average and sections resample
pairs within each subset (a stratified bootstrap: each subset keeps its size, as in the benchmark).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
RULES = ("accuracy", "longer_wins_accuracy", "shorter_wins_accuracy")  # the model, then the two length-only rules


def right_answers(chosen: Tensor, rejected: Tensor, lengths_chosen: Tensor, lengths_rejected: Tensor
                  ) -> dict[str, Tensor]:
    """Per pair, whether the model and each length-only rule ranks it right (bool tensors, strict as accuracy)."""
    return {
        "accuracy": chosen > rejected,
        "longer_wins_accuracy": lengths_chosen > lengths_rejected,
        "shorter_wins_accuracy": lengths_chosen < lengths_rejected,
    }


def resampled_counts(right: Tensor, counts: Tensor, generator: torch.Generator) -> Tensor:
    """(resamples, groups) right answers when each group's pairs are resampled with replacement: Binomial draws."""
    n = counts.double().expand(BOOTSTRAP_RESAMPLES, -1).contiguous()
    p = (right.double() / counts.double()).expand(BOOTSTRAP_RESAMPLES, -1).contiguous()
    return torch.binomial(n, p, generator=generator)


def percentile_interval(draws: Tensor) -> list[float]:
    """The central CONFIDENCE interval of bootstrap draws (the percentile method)."""
    tail = (1 - CONFIDENCE) / 2
    low, high = torch.quantile(draws.double(), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return [low, high]


def group_index(subsets: list[str]) -> tuple[list[str], Tensor]:
    """Sorted subset names and each pair's index into them."""
    names = sorted(set(subsets))
    position = {name: i for i, name in enumerate(names)}
    return names, torch.tensor([position[name] for name in subsets], dtype=torch.long)


def group_counts(index: Tensor, n_groups: int, right: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairs per group, and per rule its right answers per group (float64 counts, as resampled_counts takes them)."""
    counts = torch.bincount(index, minlength=n_groups)
    return counts, {rule: torch.bincount(index, weights=is_right.double(), minlength=n_groups)
                    for rule, is_right in right.items()}


def check_subsets(subsets: list[Any], n_pairs: int) -> list[str]:
    """The subset column as strings, one per pair; a missing value is an error naming the pair."""
    if len(subsets) != n_pairs:
        raise ValueError(f"the subset column has {len(subsets)} values for {n_pairs} pairs")
    missing = [i for i, name in enumerate(subsets) if name is None or name == ""]
    if missing:
        raise ValueError(f"pairs {missing[:10]} have no subset: every row needs one when the data has a subset column")
    return [str(name) for name in subsets]


def pair_report(
    chosen: Tensor, rejected: Tensor, lengths_chosen: Tensor | list[int], lengths_rejected: Tensor | list[int],
    subsets: list[Any] | None = None, sections: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Length-only baselines and bootstrap intervals over all pairs; per subset, macro and per section with subsets."""
    lengths_chosen, lengths_rejected = torch.as_tensor(lengths_chosen), torch.as_tensor(lengths_rejected)
    right = right_answers(chosen.float(), rejected.float(), lengths_chosen, lengths_rejected)
    n_pairs = len(chosen)
    generator = torch.Generator().manual_seed(BOOTSTRAP_SEED)
    report: dict[str, Any] = {}
    for rule in RULES:
        k = right[rule].sum().reshape(1)
        if rule != "accuracy":
            report[rule] = k.item() / n_pairs
        draws = resampled_counts(k, torch.tensor([n_pairs]), generator)[:, 0] / n_pairs
        report[f"{rule}_ci"] = percentile_interval(draws)
    report["length_tie_rate"] = (lengths_chosen == lengths_rejected).double().mean().item()
    report["bootstrap"] = {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "confidence": CONFIDENCE}
    if subsets is None:
        if sections:
            raise ValueError("--sections needs a 'subset' column in the data: sections are averages over subsets")
        return report
    names, index = group_index(check_subsets(subsets, n_pairs))
    counts, right_counts = group_counts(index, len(names), right)
    draws = {rule: resampled_counts(right_counts[rule], counts, generator) for rule in RULES}  # (resamples, subsets)
    ties = torch.bincount(index, weights=(chosen == rejected).double(), minlength=len(names))
    length_ties = torch.bincount(index, weights=(lengths_chosen == lengths_rejected).double(), minlength=len(names))

    per_subset = {}
    for i, name in enumerate(names):
        entry: dict[str, Any] = {"n_pairs": int(counts[i])}
        for rule in RULES:
            entry[rule] = right_counts[rule][i].item() / counts[i].item()
            entry[f"{rule}_ci"] = percentile_interval(draws[rule][:, i] / counts[i])
        entry["tie_rate"] = ties[i].item() / counts[i].item()
        entry["length_tie_rate"] = length_ties[i].item() / counts[i].item()
        per_subset[name] = entry
    report["per_subset"] = per_subset
    report["macro_average"] = averaged(right_counts, draws, counts, torch.ones(len(names), dtype=torch.bool))
    if sections:
        report["per_section"] = section_scores(sections, names, right_counts, draws, counts)
        report["section_average"] = section_average(sections, names, right_counts, draws, counts)
    return report


def averaged(right_counts: dict[str, Tensor], draws: dict[str, Tensor], counts: Tensor, members: Tensor
             ) -> dict[str, Any]:
    """Unweighted mean over the member subsets of each rule's accuracy, with its bootstrap interval."""
    result: dict[str, Any] = {"n_subsets": int(members.sum())}
    for rule in RULES:
        result[rule] = (right_counts[rule][members] / counts[members]).mean().item()
        result[f"{rule}_ci"] = percentile_interval((draws[rule][:, members] / counts[members]).mean(dim=1))
    return result


def section_members(sections: dict[str, list[str]], names: list[str]) -> dict[str, Tensor]:
    """Each section's subsets as a mask over `names`; a section none of whose subsets is in the data is an error."""
    masks = {}
    for section, subsets in sections.items():
        mask = torch.tensor([name in subsets for name in names], dtype=torch.bool)
        if not mask.any():
            raise ValueError(f"--sections: none of section {section!r}'s subsets {subsets} is in the data's subsets "
                             f"{names}")
        masks[section] = mask
    return masks


def section_scores(sections: dict[str, list[str]], names: list[str], right_counts: dict[str, Tensor],
                   draws: dict[str, Tensor], counts: Tensor) -> dict[str, Any]:
    """Per section: its subsets' accuracies weighted by pair count (RewardBench's calculate_scores_per_section)."""
    result = {}
    for section, mask in section_members(sections, names).items():
        n = counts[mask].sum()
        entry: dict[str, Any] = {"n_pairs": int(n), "subsets": [name for name, m in zip(names, mask.tolist(),
                                                                                          strict=True) if m]}
        missing = [name for name in sections[section] if name not in names]
        if missing:  # RewardBench skips them too; said here so that a typo does not pass unseen
            entry["missing_subsets"] = missing
        for rule in RULES:
            entry[rule] = right_counts[rule][mask].sum().item() / n.item()
            entry[f"{rule}_ci"] = percentile_interval(draws[rule][:, mask].sum(dim=1) / n)
        result[section] = entry
    return result


def section_average(sections: dict[str, list[str]], names: list[str], right_counts: dict[str, Tensor],
                    draws: dict[str, Tensor], counts: Tensor) -> dict[str, Any]:
    """Unweighted mean over sections of the count-weighted section scores, with its bootstrap interval."""
    masks = list(section_members(sections, names).values())
    result: dict[str, Any] = {"n_sections": len(masks)}
    for rule in RULES:
        points = [right_counts[rule][mask].sum() / counts[mask].sum() for mask in masks]
        result[rule] = torch.stack(points).mean().item()
        resampled = [draws[rule][:, mask].sum(dim=1) / counts[mask].sum() for mask in masks]
        result[f"{rule}_ci"] = percentile_interval(torch.stack(resampled).mean(dim=0))
    return result


def read_sections(path: str | os.PathLike) -> dict[str, list[str]]:
    """A --sections file: a JSON object mapping each section name to a list of subset names."""
    try:
        sections = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--sections {path}: cannot read it as JSON ({error})") from error
    valid = isinstance(sections, dict) and sections and all(
        isinstance(subsets, list) and subsets and all(isinstance(name, str) for name in subsets)
        for subsets in sections.values()
    )
    if not valid:
        raise ValueError(f'--sections {path} must be a JSON object of section -> list of subset names, e.g. '
                         '{"Chat": ["alpacaeval-easy", "mt-bench-easy"], "Safety": ["donotanswer"]}')
    return sections


def pearson(x: Tensor, y: Tensor) -> float | None:
    """Pearson r of two 1-D tensors; None when either is constant (r is undefined and NaN is not JSON)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    return None if denominator == 0 else (x * y).sum().div(denominator).item()


def accuracy_where(chosen: Tensor, rejected: Tensor, mask: Tensor) -> float | None:
    """Strict accuracy (chosen > rejected, as TRL) over the masked pairs; None when the mask selects none."""
    return (chosen[mask] > rejected[mask]).float().mean().item() if mask.any() else None


def length_metrics(chosen: Tensor, rejected: Tensor, lengths_chosen: Tensor, lengths_rejected: Tensor) -> dict:
    """The length-bias numbers: reward/length correlation and accuracy split by which side is longer."""
    longer, shorter = lengths_chosen > lengths_rejected, lengths_chosen < lengths_rejected
    return {
        "length_correlation": pearson(torch.cat([chosen, rejected]), torch.cat([lengths_chosen, lengths_rejected])),
        "length_correlation_chosen": pearson(chosen, lengths_chosen),
        "length_correlation_rejected": pearson(rejected, lengths_rejected),
        "accuracy_longer_chosen": accuracy_where(chosen, rejected, longer),
        "accuracy_shorter_chosen": accuracy_where(chosen, rejected, shorter),
        "n_longer_chosen": int(longer.sum()),
        "n_shorter_chosen": int(shorter.sum()),
    }


def finite_or_none(value: Any) -> Any:
    """The value with every NaN or inf float (in nested dicts and lists) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(item) for item in value]
    return value
