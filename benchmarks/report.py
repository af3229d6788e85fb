"""Turning benchmark results into a markdown table and a PNG; ratios first, absolute numbers after."""

from __future__ import annotations

import math
from pathlib import Path


def reference_name(row: dict) -> str:
    """Train steps compare with the floor of the same checkpointing setting; inference with the plain forward."""
    if not row["trains"]:
        return "forward"
    return "floor+ckpt" if row["checkpointing"] else "floor"


def ratios(results: dict) -> dict[str, dict[str, float]]:
    """Per row: median and min time over its reference's."""
    by_name = {row["name"]: row for row in results["rows"]}
    out = {}
    for row in results["rows"]:
        ref = by_name[reference_name(row)]
        out[row["name"]] = {"median": row["median_s"] / ref["median_s"], "min": row["min_s"] / ref["min_s"]}
    return out


def headline(results: dict) -> list[str]:
    """lora-rm against PEFT and against the floor, per rank: the numbers the suite exists for."""
    by_name = {row["name"]: row for row in results["rows"]}
    lines = []
    for r in results["setup"]["ranks"]:
        ours, peft = by_name[f"lora-rm r={r}"], by_name.get(f"peft r={r}")
        floor, fwd = by_name["floor"], by_name["forward"]
        merged, unmerged = by_name[f"forward merged r={r}"], by_name[f"forward unmerged r={r}"]
        theory = ours["flop_fraction"]
        parts = [f"r={r}: lora-rm/floor {_pair(ours, floor)}"]
        if peft is not None:
            parts += [f"PEFT/floor {_pair(peft, floor)}", f"**lora-rm/PEFT {_pair(ours, peft)}**"]
        parts += [f"merged/plain forward {_pair(merged, fwd)}", f"unmerged/plain forward {_pair(unmerged, fwd)}",
                  f"FLOP theory: +{100 * theory['adapted_forward']:.1f}% per adapted layer forward, "
                  f"+{100 * theory['adapted_step']:.1f}% per adapted layer step "
                  f"(+{100 * theory['adapted_step_folded']:.1f}% folded, lora-rm's fp32 path)"]
        lines.append("- " + "; ".join(parts) + " (median, min)")
    return lines


def _pair(a: dict, b: dict) -> str:
    return f"{a['median_s'] / b['median_s']:.3f}x ({a['min_s'] / b['min_s']:.3f}x)"


def markdown(results: dict) -> str:
    """The table printed on stdout and pasted in the README."""
    s = results["setup"]
    memory = "CUDA max_memory_allocated" if s["device"].startswith("cuda") else "peak RSS of a process per row"
    lines = [
        f"model {s['model']} ({_config(s['config'])}), {s['pairs']} pairs x 2 x {s['seq_len']} tokens "
        f"= {s['tokens_per_step']} tokens/step, {s['dtype']}, LoRA on {_targets(s['targets'])}"
        + ("" if s.get("variant", "lora") == "lora" else f", variant {s['variant']} (lora-rm and PEFT rows)"),
        f"{s['hardware']} ({s['device']}), {s['threads']} threads of {s['cpu_count']} cores, load average "
        f"{s['load_average'][0]:.1f} at start; torch {s['torch']}, PEFT {s['peft']}; {s['repeats']} interleaved "
        f"repeats after {s['warmup']} warm-up; memory: {memory}",
        "",
        "| configuration | x ref (median) | x ref (min) | ref | median ms | min ms | tokens/s | peak MiB | "
        "step MiB | trainable params | optimizer MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rat = ratios(results)
    for row in results["rows"]:
        name = row["name"]
        lines.append(
            f"| {name} | {rat[name]['median']:.3f} | {rat[name]['min']:.3f} | {reference_name(row)} | "
            f"{1000 * row['median_s']:.1f} | {1000 * row['min_s']:.1f} | {row['tokens_per_s']:,.0f} | "
            f"{_mib(row.get('peak_mib'))} | {_mib(row.get('step_mib'))} | {row['trainable_params']:,} | "
            f"{row['optimizer_state_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines + [""] + headline(results))


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _config(config: dict) -> str:
    return (f"hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
            f"intermediate {config['intermediate_size']}, vocab {config['vocab_size']}")


def _targets(targets: list[str] | str) -> str:
    if isinstance(targets, str):
        return targets
    short = sorted({t.split(".")[-1] for t in targets})
    return ", ".join(short)


def plot(results: dict, path: Path) -> None:
    """Time ratio to the reference (bar: median, dot: min) and the step's peak memory, per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = [row["name"] for row in rows]
    rat = ratios(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.35 * len(rows) + 1.5), sharey=True)
    y = list(range(len(rows)))
    colors = [_color(row) for row in rows]
    left.barh(y, [rat[n]["median"] for n in names], color=colors)
    left.plot([rat[n]["min"] for n in names], y, "k.", label="min")
    left.axvline(1.0, color="k", lw=0.8)
    left.set_xlabel("time / reference (floor for train steps, plain forward for inference)")
    left.legend(loc="lower right")
    step_mib = [row.get("step_mib", math.nan) for row in rows]
    right.barh(y, step_mib, color=colors)
    right.set_xlabel("memory the step adds (MiB)")
    left.set_yticks(y, names)
    left.invert_yaxis()
    s = results["setup"]
    fig.suptitle(f"{s['model']}, {s['tokens_per_step']} tokens/step, {s['dtype']}, {s['hardware']} ({s['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _color(row: dict) -> str:
    return {"lora-rm": "tab:green", "peft": "tab:orange", "full": "tab:red", "floor": "tab:gray"}.get(
        row["method"], "tab:blue"
    )
