"""The GPU check: cuda tests, overhead rows (bf16 and nf4), a one-layer kernel profile, two trainings and the memory
ladder, in one table, in at most 4 minutes on one H100/H200.

    python -m benchmarks.gpu_check                  # one CUDA GPU; --budget caps the whole run (default 235 s)
    python -m benchmarks.gpu_check --smoke          # every section, tiny, on CPU (tests/test_benchmarks.py)
    python -m benchmarks.gpu_check --sections "overhead bf16" "layer profile"   # some sections only

Sections, in order (SECTIONS; sizes in FULL and SMOKE):
1. cuda tests: `pytest -m cuda` over the test files that use the marker (test_lora_fast.py, test_train.py);
2. overhead bf16: benchmarks.overhead's train steps at Qwen2.5-0.5B's shape, bf16, 4 pairs x 2 x 1024 tokens:
   frozen floor, full fine-tuning, PEFT and lora-rm at r=8 and r=64, each with and without checkpointing;
3. overhead nf4: the floor, lora-rm and PEFT at r=8 on the same base quantized to nf4 (needs bitsandbytes);
4. layer profile: the top kernels of one adapted layer's step at 896->896, 896->4864 and 4864->896;
5. packed attention: benchmarks.packed_attention, the SDPA kernel packed rows' 4D masks get, each backend alone on
   such a mask, and padded / padding_free / shared_prompt steps of the same pairs;
6. train bf16, train nf4: `lora-rm train`'s train() on a random-init 0.5B-shaped model, batch 8, max length 32;
7. memory ladder: benchmarks.memory's rows (fp32 / bf16 / nf4 base, lora-rm beside PEFT), as many as time allows.

Timing (benchmarks/paired.py): the configurations of a section are timed in a rotated order every round, with CUDA
events (perf_counter on CPU), and each row reports the median and spread of its per-round ratio to the floor timed
in the same round. Each section runs in a process of its own with a time limit (its budget, capped by what is left
of --budget; the child and its children are killed past it) and streams its rows back as they are done: a crash,
a CUDA error or a slow section costs only that section, whose error or "timed out" is a row of the table.
Writes OUT/gpu_check.json and OUT/gpu_check.md (OUT: --out, else $OUT, else benchmarks/results/gpu).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path

import torch

from . import layer_profile, memory, overhead, packed_attention, paired
from .overhead import REPO_ROOT, Variant


@dataclass(frozen=True)
class Plan:
    """Sizes and time limits of one run: FULL on a GPU, SMOKE anywhere."""

    model: str  # benchmarks.overhead preset of the overhead sections
    seq_len: int
    pairs: int
    ranks: tuple[int, ...]
    rounds: int  # timed rounds of an overhead section (fewer when its time runs short)
    warmup: int  # untimed rounds before them
    memory_flags: tuple[str, ...]  # benchmarks.memory arguments
    train_steps: int
    train_shape: tuple[tuple[str, int], ...]  # Qwen2Config sizes of the trained model
    max_eval_rows: int | None
    layer_shapes: tuple[tuple[int, int], ...]  # (d_in, d_out) of the profiled layers
    layer_tokens: int
    top_kernels: int
    budget_s: float  # the whole run
    threads: int | None  # torch threads of a section (smoke: 1, so a busy shared CPU does not stall OpenMP)
    section_s: tuple[tuple[str, float], ...]  # each section's own limit


QWEN_05B = (("hidden_size", 896), ("intermediate_size", 4864), ("num_hidden_layers", 24), ("num_attention_heads", 14))
FULL = Plan(
    model="0.5b", seq_len=1024, pairs=4, ranks=(8, 64), rounds=10, warmup=2,
    memory_flags=("--pairs", "4", "--seq-len", "512"), train_steps=50, train_shape=QWEN_05B, max_eval_rows=None,
    layer_shapes=((896, 896), (896, 4864), (4864, 896)), layer_tokens=8 * 1024, top_kernels=5, budget_s=235,
    threads=None,
    # the memory ladder comes last and takes what the others leave (at least 15 s when they all run to their limit)
    section_s=(("cuda tests", 30), ("overhead bf16", 60), ("overhead nf4", 30), ("layer profile", 15),
               ("packed attention", 15), ("train bf16", 35), ("train nf4", 35), ("memory ladder", 90)),
)
SMOKE = Plan(
    model="tiny", seq_len=16, pairs=1, ranks=(2,), rounds=3, warmup=1,
    memory_flags=("--tiny", "--pairs", "1", "--seq-len", "8", "--checkpointing", "no"), train_steps=3,
    train_shape=(("hidden_size", 64), ("intermediate_size", 128), ("num_hidden_layers", 2), ("num_attention_heads", 4)),
    max_eval_rows=16, layer_shapes=((64, 64), (64, 352), (352, 64)), layer_tokens=64, top_kernels=3, budget_s=300,
    threads=1,
    section_s=(("cuda tests", 60), ("overhead bf16", 60), ("overhead nf4", 60), ("layer profile", 60),
               ("packed attention", 60), ("train bf16", 60), ("train nf4", 60), ("memory ladder", 60)),
)
CUDA_MARK = re.compile(r"mark\.cuda\b")  # @pytest.mark.cuda, pytestmark = pytest.mark.cuda, marks=pytest.mark.cuda


def row(label: str, value: str, detail: str = "", **data) -> dict:
    """One line of the table; `data` keeps the numbers for the JSON."""
    return {"row": label, "value": value, "detail": detail, **data}


def has_bitsandbytes() -> bool:
    return find_spec("bitsandbytes") is not None


# --------------------------------------------------------------------------------------------- sections


def cuda_tests(plan: Plan, device: str, deadline: float) -> Iterator[dict]:
    """`pytest -m cuda` over the files that use the marker: pass/fail, or that there are none."""
    files = [str(p) for p in sorted((REPO_ROOT / "tests").glob("test_*.py")) if CUDA_MARK.search(p.read_text())]
    if not files:
        yield row("pytest -m cuda", "no cuda tests collected", "no test file uses pytest.mark.cuda")
        return
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *files]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=max(1.0, deadline - time.monotonic()))
    lines = done.stdout.strip().splitlines() or ["(no output)"]
    failed = [line.removeprefix("FAILED ") for line in lines if line.startswith(("FAILED", "ERROR"))]
    value = {0: "passed" if " passed" in lines[-1] else "all skipped", 5: "no cuda tests collected"}.get(
        done.returncode, "FAILED")
    yield row("pytest -m cuda", value, "; ".join([lines[-1], *failed]), files=files, returncode=done.returncode)


def overhead_args(plan: Plan, device: str) -> argparse.Namespace:
    """benchmarks.overhead's settings for this plan, bf16 on any device."""
    return overhead.parse_args(["--model", plan.model, "--seq-len", str(plan.seq_len), "--pairs", str(plan.pairs),
                                "--ranks", *map(str, plan.ranks), "--dtype", "bf16", "--device", device])


def comparisons(configs: list[Variant]) -> list[tuple[Variant, Variant]]:
    """(config, reference) pairs: each against its floor, then lora-rm against PEFT and full at equal settings."""
    def floor_of(v: Variant) -> Variant:
        return next(u for u in configs if u.method == "floor" and u.checkpointing == v.checkpointing)

    pairs = [(v, floor_of(v)) for v in configs]
    for v in (v for v in configs if v.method == "lora-rm"):
        pairs += [(v, u) for u in configs if u.checkpointing == v.checkpointing
                  and (u.method == "full" or (u.method == "peft" and u.rank == v.rank))]
    return pairs


def overhead_rows(configs: list[Variant], base: torch.nn.Module, args: argparse.Namespace, plan: Plan,
                  deadline: float) -> Iterator[dict]:
    """Time the configurations in rotated rounds; a row per (config, reference) with its paired-ratio spread."""
    built = {v.name: overhead.build(v, base, args) for v in configs}
    batch = overhead.make_batch(args, base.config.vocab_size)

    def measure(name: str) -> float:
        return overhead.timed(overhead.train_step, *built[name], batch, args)[0]

    times = paired.timed_rounds(list(built), measure, plan.rounds, plan.warmup, deadline)
    for v, ref in comparisons(configs):
        stats = paired.spread(paired.paired(times, v.name, ref.name))
        median_ms = 1000 * paired.spread(times[v.name])["median"]
        label = v.name if ref.method == "floor" else f"{v.name} / {ref.name}"
        unit = f"x {ref.name}" if ref.method == "floor" else "x"
        yield row(label, f"{stats['median']:.3f}{unit}", f"{paired.describe(stats)}; {median_ms:.1f} ms median",
                  ratio=stats, median_ms=median_ms, times_s=times[v.name])


def overhead_bf16(plan: Plan, device: str, deadline: float) -> Iterator[dict]:
    """Floor, full, PEFT and lora-rm at each rank, with and without checkpointing, on a bf16 base."""
    args = overhead_args(plan, device)
    configs = [v for v in overhead.variants(list(plan.ranks), with_peft=overhead.peft_available()) if v.trains]
    yield from overhead_rows(configs, overhead.build_base(args), args, plan, deadline)


def overhead_nf4(plan: Plan, device: str, deadline: float) -> Iterator[dict]:
    """Floor, lora-rm and PEFT at the first rank on the same base quantized to nf4 while loading (as users load)."""
    if not has_bitsandbytes():
        yield row("nf4 rows", "skipped: no bitsandbytes")
        return
    from lora_rm.model_io import load_pretrained

    args = overhead_args(plan, device)
    with tempfile.TemporaryDirectory() as folder:
        overhead.build_base(args).save_pretrained(folder)
        base = load_pretrained(folder, torch.bfloat16, load_in_4bit=True, device=device).train()
    rank = plan.ranks[0]
    configs = [Variant("nf4 floor", "floor"), Variant(f"nf4 lora-rm r={rank}", "lora-rm", rank),
               Variant(f"nf4 peft r={rank}", "peft", rank)]
    yield from overhead_rows(configs, base, args, plan, deadline)


def layer_profiles(plan: Plan, device: str, deadline: float) -> Iterator[dict]:
    """Per real layer shape: each implementation's step total, and lora-rm's and PEFT's top kernels."""
    rank, unit = plan.ranks[0], "kernel" if device == "cuda" else "CPU op"
    for d_in, d_out in plan.layer_shapes:
        shape = f"{d_in}->{d_out} r={rank}"
        for impl in layer_profile.IMPLS:
            kernels, total = layer_profile.top_kernels(impl, d_in, d_out, plan.layer_tokens, rank, device,
                                                       plan.top_kernels)
            yield row(f"{shape} {impl}", f"{total:.3f} ms/step", f"all {unit}s of one step, {plan.layer_tokens} "
                      "tokens", total_ms=total)
            for i, kernel in enumerate(kernels if impl != "base" else []):
                yield row(f"{shape} {impl} #{i + 1}", f"{kernel.ms:.3f} ms", f"{kernel.calls:g} calls/step: "
                          f"{kernel.name[:90]}", kernel=asdict(kernel))


def packed_attention_rows(plan: Plan, device: str, deadline: float) -> Iterator[dict]:
    """The SDPA kernel packed rows' 4D masks get here, and packed steps beside padded ones (issue 22, item 4)."""
    yield from packed_attention.measure(overhead_args(plan, device), plan.rounds, plan.warmup, deadline)


def save_model_folder(folder: Path, shape: dict) -> None:
    """A random-init Qwen2-shaped reward model with the built-in tokenizer, for train()'s --model."""
    from transformers import AutoModelForSequenceClassification, Qwen2Config

    from lora_rm.builtin import builtin_tokenizer

    tokenizer = builtin_tokenizer()
    config = Qwen2Config(**shape, num_key_value_heads=2, vocab_size=len(tokenizer), num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, max_position_embeddings=256)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def training(plan: Plan, device: str, nf4: bool) -> Iterator[dict]:
    """train() on the built-in task, batch 8, max length 32: pairs/s as train() reports it, and the log's."""
    from lora_rm.config import TrainConfig
    from lora_rm.train import train

    if nf4 and device == "cpu":  # bf16 activations over a 4-bit layer on CPU: slow, and nothing to learn here
        flags = dict(load_in_4bit=True)
    else:  # a bf16 base computes in bf16 itself (no autocast): the in-place path, for nf4 too
        flags = dict(load_in_4bit=True, base_dtype="bf16") if nf4 else dict(base_dtype="bf16")
    with tempfile.TemporaryDirectory() as folder:
        save_model_folder(Path(folder) / "model", dict(plan.train_shape))
        started = time.perf_counter()
        final = train(TrainConfig(model=str(Path(folder) / "model"), output=str(Path(folder) / "run"),
                                  max_steps=plan.train_steps, batch_size=8, max_length=32, log_every=10,
                                  max_eval_rows=plan.max_eval_rows, device=device, overwrite=True, progress=False,
                                  **flags))
        seconds = time.perf_counter() - started
        log = [json.loads(line) for line in (Path(folder) / "run" / "log.jsonl").read_text().splitlines()]
    loop = [record["pairs_per_s"] for record in log if "pairs_per_s" in record][-1]
    yield row(f"{'nf4' if nf4 else 'bf16'} base, {plan.train_steps} steps", f"{final['train_pairs_per_s']:.1f} pairs/s",
              f"train()'s train_pairs_per_s (the steps alone); with the final save and eval "
              f"{final['total_pairs_per_s']:.1f}; log.jsonl's last pairs_per_s {loop:.1f}; accuracy "
              f"{final['accuracy']:.3f}; {seconds:.0f} s in train()",
              pairs_per_s=final["train_pairs_per_s"], total_pairs_per_s=final["total_pairs_per_s"],
              log_pairs_per_s=loop, accuracy=final["accuracy"])


def train_bf16(plan: Plan, device: str, deadline: float) -> Iterator[dict]:
    """`lora-rm train` with a bf16 base under bf16 autocast."""
    yield from training(plan, device, nf4=False)


def train_nf4(plan: Plan, device: str, deadline: float) -> Iterator[dict]:
    """`lora-rm train --load-in-4bit` (skipped without bitsandbytes)."""
    if not has_bitsandbytes():
        yield row("nf4 base", "skipped: no bitsandbytes")
        return
    yield from training(plan, device, nf4=True)


def memory_ladder(plan: Plan, device: str, deadline: float) -> Iterator[dict]:
    """benchmarks.memory's rows as they come: peak MiB, x the fp32 base's, and lora-rm / PEFT on PEFT's row."""
    bases = [b for b in memory.BASES if b != "nf4" or has_bitsandbytes()]
    args = memory.parse_args([*plan.memory_flags, "--device", device, "--bases", *bases])
    peaks = {}
    for r in memory.ladder(args):
        ckpt = " +ckpt" if r["checkpointing"] else ""
        peaks[r["base"], r["impl"], ckpt] = r["peak_mib"]
        detail = f"{r['peak_mib'] / peaks[('fp32', r['impl'], ckpt)]:.3f}x the fp32 base's peak" \
            if ("fp32", r["impl"], ckpt) in peaks else ""
        if r["impl"] == "peft" and (r["base"], "lora-rm", ckpt) in peaks:
            detail += f"; lora-rm / PEFT {peaks[r['base'], 'lora-rm', ckpt] / r['peak_mib']:.3f}"
        yield row(f"{r['base']} {r['impl']}{ckpt}", f"{r['peak_mib']:,.0f} MiB", f"{detail}; step {r['step_s']:.2f} s",
                  **r)


SECTIONS: dict[str, Callable[[Plan, str, float], Iterator[dict]]] = {
    "cuda tests": cuda_tests, "overhead bf16": overhead_bf16, "overhead nf4": overhead_nf4,
    "layer profile": layer_profiles, "packed attention": packed_attention_rows, "train bf16": train_bf16,
    "train nf4": train_nf4, "memory ladder": memory_ladder,
}


# ---------------------------------------------------------------------------------------------- driver


def section_child(name: str, plan: Plan, device: str, deadline: float, conn) -> None:
    """In the section's own process (and process group): send each row, then 'done' or the error."""
    os.setpgrp()  # one group: a timeout kills the section's own children (memory rows, pytest) with it
    if device != "cuda":  # forked: see memory.no_weight_loading_threads
        memory.no_weight_loading_threads()
    if plan.threads:
        torch.set_num_threads(plan.threads)
    try:
        for line in SECTIONS[name](plan, device, deadline):
            conn.send(("row", line))
        conn.send(("done", None))
    except BaseException as error:  # noqa: B036  a section's failure is a table row, whatever it is
        traceback.print_exc()
        conn.send(("error", f"{type(error).__name__}: {error}".replace("\n", " ")[:300]))
    finally:
        conn.close()


def run_section(name: str, plan: Plan, device: str, limit: float) -> dict:
    """Run one section in a fresh process (spawned on CUDA, forked on CPU) for at most `limit` seconds."""
    context = multiprocessing.get_context("spawn" if device == "cuda" else "fork")  # CUDA cannot be forked
    if device != "cuda":  # imported once here, not again in each forked section
        import peft  # noqa: F401

        if has_bitsandbytes():
            import bitsandbytes  # noqa: F401
    here, there = context.Pipe(duplex=False)
    started = time.monotonic()
    deadline = started + limit
    # the child stops timing rounds a little before the hard limit, leaving time to send its rows
    child = context.Process(target=section_child, args=(name, plan, device, deadline - min(5.0, 0.1 * limit), there))
    child.start()
    there.close()
    rows, status = [], f"timed out after {limit:.0f} s"
    try:
        while (left := deadline - time.monotonic()) > 0 and here.poll(left):
            kind, payload = here.recv()
            if kind == "row":
                rows.append(payload)
                continue
            status = "ok" if kind == "done" else f"error: {payload}"
            break
    except EOFError:
        child.join(5)
        status = f"error: the section's process ended without a result (exit code {child.exitcode})"
    finally:
        stop(child)
    return {"name": name, "status": status, "rows": rows, "seconds": time.monotonic() - started, "limit_s": limit}


def stop(child: multiprocessing.process.BaseProcess) -> None:
    """Kill a section's process group if it is still running (a timeout), then reap the process."""
    child.join(1)
    if child.is_alive():
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:  # not yet in its own group
            child.kill()
    child.join()


def markdown(results: list[dict], header: str) -> str:
    """The one table: a status line per section, then its rows."""
    lines = [header, "", "| section | row | value | detail |", "|---|---|---|---|"]
    for section in results:
        lines.append(f"| {section['name']} | (section) | {section['status']} | "
                     f"{section['seconds']:.0f} s of {section['limit_s']:.0f} s |")
        for line in section["rows"]:
            cells = [section["name"], line["row"], line["value"], line["detail"]]
            lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default: the plan's)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO_ROOT / "benchmarks" / "results" / "gpu"),
                        help="folder for gpu_check.json and gpu_check.md (default $OUT, else benchmarks/results/gpu)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the sections one after the other within the budget; write and print the table; 1 unless all were ok."""
    args = parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (not a GPU run)"
    started, budget, limits = time.monotonic(), args.budget or plan.budget_s, dict(plan.section_s)
    results = []
    for name in args.sections:
        left = budget - (time.monotonic() - started)
        if left < 3:
            results.append({"name": name, "status": "skipped: out of time", "rows": [], "seconds": 0.0, "limit_s": 0})
            continue
        results.append(run_section(name, plan, device, min(limits[name], left)))
        print(f"[gpu_check] {name}: {results[-1]['status']} ({results[-1]['seconds']:.0f} s)", flush=True)
    header = (f"# GPU check on {card} ({'smoke' if args.smoke else 'full'}; torch {torch.__version__}; "
              f"{time.monotonic() - started:.0f} s of {budget:.0f} s)")
    table = markdown(results, header)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"card": card, "device": device, "torch": torch.__version__, "plan": asdict(plan), "sections": results}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "gpu_check.md").write_text(table + "\n")
    print(table)
    return int(any(r["status"] != "ok" for r in results))


if __name__ == "__main__":
    sys.exit(main())
