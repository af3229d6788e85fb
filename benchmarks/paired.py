"""Timing configurations against each other fairly: a rotated order every round, per-round paired ratios.

A slow moment (another process, a clock change) hits the configurations timed close to it. Timing them in a fixed
order every round puts the same neighbours side by side each time; rotating the start (round k begins at
configuration k mod n) spreads that. A ratio is taken inside each round (config / reference, both timed in that
round), and the table reports the median and spread of those per-round ratios, not a ratio of two medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def seconds(call: Callable[[], None], device: str) -> float:
    """Wall seconds of one call: CUDA events after a synchronisation on a GPU, perf_counter elsewhere."""
    if torch.device(device).type != "cuda":
        started = time.perf_counter()
        call()
        return time.perf_counter() - started
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000


def rotation(names: list[str], round_index: int) -> list[str]:
    """The timing order of one round: round k starts at configuration k mod n."""
    start = round_index % len(names)
    return names[start:] + names[:start]


def timed_rounds(names: list[str], measure: Callable[[str], float], rounds: int, warmup: int,
                 deadline: float) -> dict[str, list[float]]:
    """Seconds per configuration per round, rotated; stops before a round that would end past `deadline`
    (time.monotonic()), keeping at least one timed round."""
    for k in range(warmup):
        for name in rotation(names, k):
            measure(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for k in range(rounds):
        started = time.monotonic()
        for name in rotation(names, k):
            times[name].append(measure(name))
        if k + 1 < rounds and time.monotonic() + (time.monotonic() - started) > deadline:
            break
    return times


def paired(times: dict[str, list[float]], name: str, reference: str) -> list[float]:
    """name / reference, round by round (both timed in the same round)."""
    return [a / b for a, b in zip(times[name], times[reference], strict=True)]


def spread(values: list[float]) -> dict[str, float]:
    """Median, interquartile range and range of a list of ratios."""
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "min": ordered[0], "max": ordered[-1],
            "n": len(ordered)}


def describe(stats: dict[str, float]) -> str:
    """'IQR a-b, range c-d, n rounds' for the table's detail column."""
    return (f"IQR {stats['q1']:.3f}-{stats['q3']:.3f}, range {stats['min']:.3f}-{stats['max']:.3f}, "
            f"{stats['n']} paired rounds")
