"""The memory ladder: peak memory of a LoRA reward-model train step on a realistic shape, fp32 / bf16 / nf4 base.

    python -m benchmarks.memory            # Qwen2.5-0.5B's shape, random init, 1 pair x 256 tokens on CPU
    python -m benchmarks.memory --pairs 4 --seq-len 512 --device cuda

Each row runs in a fresh process: load the base (from a folder saved once, so nf4 quantizes while loading as it
does for a hub model), add LoRA r=16 to every linear layer, take two Bradley-Terry steps (the second holds the
optimizer state). Peak memory is what loading and the steps add to the process: on CUDA max_memory_allocated; on
CPU the peak of Linux's RssAnon (the process's own allocations, sampled every 2 ms) minus its value before
loading. The loaded weights are copied into the process's own memory (as moving them to a GPU would): a bf16 load
of a bf16 file otherwise leaves them as pages of the memory-mapped file, which RssAnon does not count. VmHWM (all
resident pages, file-backed included, also while the file is read) is reported beside it. PEFT's rows are its
documented recipe: get_peft_model, and prepare_model_for_kbit_training first for an nf4 base.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, Qwen2Config

from lora_rm import LoraConfig, add_lora, enable_gradient_checkpointing
from lora_rm.model_io import load_pretrained

from .overhead import REPO_ROOT, _proc_status_bytes, train_step

# Qwen2.5-0.5B's published config.json, with a one-output score head.
QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
                num_labels=1, pad_token_id=151643)
TINY = dict(QWEN_05B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=256, pad_token_id=0)  # for the smoke test
BASES = ("fp32", "bf16", "nf4")


def save_base(folder: str, shape: dict) -> None:
    """The random-init model, saved once in bf16 (each row loads it in its own dtype)."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(Qwen2Config(**shape), dtype=torch.bfloat16)
    model.save_pretrained(folder)


def build(folder: str, base: str, impl: str, checkpointing: bool, device: str) -> torch.nn.Module:
    """The base in its dtype with LoRA r=16 on every linear layer, as lora-rm or as PEFT's recipe does it."""
    dtype = torch.float32 if base == "fp32" else torch.bfloat16  # nf4: embeddings, norms and head in bf16
    if base == "nf4":  # lora-rm's own loader: nf4 linear layers, the head never quantized
        model = load_pretrained(folder, dtype, load_in_4bit=True, device=device)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=dtype)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    if impl == "lora-rm":
        add_lora(model, lora)
        if checkpointing:
            enable_gradient_checkpointing(model)
        return model.to(device) if base != "nf4" else model
    import peft

    if base == "nf4":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        enable_gradient_checkpointing(model)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, target_modules="all-linear")
    model = peft.get_peft_model(model, config)
    return model.to(device) if base != "nf4" else model


class AnonPeak:
    """The peak of this process's RssAnon, sampled in a thread (Linux keeps a peak only of the whole RSS)."""

    def __init__(self) -> None:
        self.peak, self._stop = _proc_status_bytes("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _proc_status_bytes("RssAnon"))

    def restart(self) -> int:
        """The peak so far; from now on, the peak of what follows."""
        peak, self.peak = self.peak, _proc_status_bytes("RssAnon")
        return peak

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _proc_status_bytes("RssAnon"))


def no_weight_loading_threads() -> None:
    """Load weights on this thread only. In a forked process ATen work cannot start on a new thread once the parent
    has built its thread pool (PyTorch: "pool INTERNAL ASSERT FAILED ... Invalid thread pool!"), and transformers
    loads weights on a thread pool unless HF_DEACTIVATE_ASYNC_LOAD is set."""
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"


def measure(folder: str, base: str, impl: str, checkpointing: bool, args: argparse.Namespace) -> dict:
    """One row, in the calling (fresh) process."""
    if torch.device(args.device).type != "cuda":
        no_weight_loading_threads()
    import peft  # noqa: F401  libraries are imported before the baseline: their code is not the model's

    if base == "nf4":
        import bitsandbytes  # noqa: F401

    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before, before_anon = _proc_status_bytes("VmRSS"), _proc_status_bytes("RssAnon")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # VmHWM := current RSS
        anon = AnonPeak()
    started = time.perf_counter()
    model = build(folder, base, impl, checkpointing, args.device).train()
    if not cuda:  # own the weights, as a copy to a GPU would: a bf16 load of a bf16 file maps it (file pages, not anon)
        with torch.no_grad():
            for param in model.parameters():
                if param.is_floating_point():
                    param.data = param.data.clone()
    loaded_s = time.perf_counter() - started
    if not cuda:
        load_peak, resident = anon.restart(), _proc_status_bytes("RssAnon")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator().manual_seed(1)
    vocab_size = (TINY if args.tiny else QWEN_05B)["vocab_size"]
    input_ids = torch.randint(1, vocab_size - 1, (2 * args.pairs, args.seq_len), generator=generator)
    batch = {"input_ids": input_ids.to(args.device), "attention_mask": torch.ones_like(input_ids).to(args.device)}
    autocast = torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=base != "fp32")
    times = []
    for _ in range(2):
        step_started = time.perf_counter()
        with autocast:
            train_step(model, batch, optimizer)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - step_started)
    row = {"base": base, "impl": impl, "checkpointing": checkpointing, "step_s": times[-1], "load_s": loaded_s}
    if cuda:
        return {**row, "peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20}
    step_peak = anon.stop()
    mib = {"load_peak_mib": load_peak, "resident_mib": resident, "step_peak_mib": step_peak,
           "peak_mib": max(load_peak, step_peak)}
    return {**row, **{name: (value - before_anon) / 2**20 for name, value in mib.items()},
            "vmhwm_mib": (_proc_status_bytes("VmHWM") - before) / 2**20}


def ladder(args: argparse.Namespace) -> Iterator[dict]:
    """The rows one by one, each measured in a fresh process (gpu_check keeps those done when time runs out)."""
    method = "spawn" if torch.device(args.device).type == "cuda" else "fork"
    if method == "fork":  # imported once here, not again in every row's process
        import peft  # noqa: F401

        if "nf4" in args.bases:
            import bitsandbytes  # noqa: F401
    with tempfile.TemporaryDirectory() as folder:
        save_base(folder, TINY if args.tiny else QWEN_05B)
        for checkpointing in args.checkpointing:
            for base in args.bases:
                for impl in ("lora-rm", "peft"):
                    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method)) as pool:
                        row = pool.submit(measure, folder, base, impl, checkpointing, args).result()
                    print(json.dumps(row), flush=True)
                    yield row


def run(args: argparse.Namespace) -> list[dict]:
    return list(ladder(args))


def markdown(rows: list[dict]) -> str:
    """The ladder with each row's peak against the fp32 row of the same implementation and checkpointing."""
    fp32 = {(r["impl"], r["checkpointing"]): r["peak_mib"] for r in rows if r["base"] == "fp32"}
    peft = {(r["base"], r["checkpointing"]): r["peak_mib"] for r in rows if r["impl"] == "peft"}
    lines = ["| base | checkpointing | impl | peak MiB | x fp32 peak | x PEFT peak | after load MiB | load peak MiB | "
             "step peak MiB | step s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key, peft_key = (r["impl"], r["checkpointing"]), (r["base"], r["checkpointing"])
        vs_fp32 = f"{r['peak_mib'] / fp32[key]:.3f}" if key in fp32 else "-"
        vs_peft = f"{r['peak_mib'] / peft[peft_key]:.3f}" if peft_key in peft else "-"
        phase_keys = ("resident_mib", "load_peak_mib", "step_peak_mib")
        phases = " | ".join(f"{r[k]:,.0f}" if k in r else "-" for k in phase_keys)
        lines.append(f"| {r['base']} | {'yes' if r['checkpointing'] else 'no'} | {r['impl']} | {r['peak_mib']:,.0f} | "
                     f"{vs_fp32} | {vs_peft} | {phases} | {r['step_s']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--bases", nargs="+", choices=BASES, default=list(BASES))
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of width 64, for the smoke test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpointing", nargs="+", choices=["no", "yes"], default=["no", "yes"],
                        help="rows without and/or with gradient checkpointing")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "memory"))
    args = parser.parse_args(argv)
    args.checkpointing = [choice == "yes" for choice in args.checkpointing]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args)
    table = markdown(rows)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"setup": vars(args), "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
