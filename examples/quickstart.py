"""Quickstart: train a LoRA reward model on the built-in arithmetic task, reload it, and score two answers.

    python examples/quickstart.py            # the built-in task's tuned settings (builtin.BUILTIN_TRAIN_DEFAULTS)
    python examples/quickstart.py --fast     # a few steps: checks that everything runs, learns nothing yet

The built-in task asks "What is a + b ?"; the chosen answer is the sum, the rejected one a wrong sum. Everything
runs offline on a CPU: the tiny Llama and its tokenizer are built in lora_rm.builtin, nothing is downloaded.
"""

from __future__ import annotations

import argparse

from lora_rm import LoraConfig, load_adapter
from lora_rm.builtin import BUILTIN_TRAIN_DEFAULTS
from lora_rm.config import TrainConfig
from lora_rm.evaluate import score_texts
from lora_rm.model_io import load_model_and_tokenizer
from lora_rm.train import train

FAST = dict(max_steps=3, max_rows=100)  # 3 optimizer steps on 90 pairs, 10 held out


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train, save, reload, score; returns the two rewards and the held-out accuracy."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/quickstart", help="adapter folder (replaced on each run)")
    parser.add_argument("--fast", action="store_true", help="a few steps only, for the tests")
    args = parser.parse_args(argv)

    # 1. Train. train() builds the base model, wraps its linear layers with add_lora(model, config.lora), runs
    #    the Bradley-Terry loop on (chosen, rejected) pairs and saves adapter + score head in PEFT's format.
    config = TrainConfig(
        model="builtin",
        dataset="builtin",
        output=args.output,
        lora=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
        overwrite=True,
        progress=False,
        **{**BUILTIN_TRAIN_DEFAULTS, **(FAST if args.fast else {})},
    )
    metrics = train(config)
    print(f"held-out accuracy after training: {metrics['accuracy']:.3f} on {metrics['n_pairs']} pairs")

    # 2. Reload: a fresh copy of the same base model, plus the adapter folder train() wrote.
    model, tokenizer = load_model_and_tokenizer("builtin")
    load_adapter(model, args.output).eval()

    # 3. Score: one reward per text (prompt + answer), encoded exactly as training encoded each side.
    question = "What is 3 + 4 ?"
    right, wrong = score_texts(model, tokenizer, [f"{question} 7", f"{question} 9"])
    print(f"reward('{question} 7') = {right:+.4f}   <- the right sum")
    print(f"reward('{question} 9') = {wrong:+.4f}")
    print("the right answer scores higher" if right > wrong else "the wrong answer scores higher (train longer)")
    return {"right": right, "wrong": wrong, "accuracy": metrics["accuracy"]}


if __name__ == "__main__":
    main()
