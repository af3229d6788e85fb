"""PEFT interop: an adapter saved by lora-rm loads in PEFT, and one saved by PEFT loads in lora-rm.

Needs PEFT, which lora-rm itself does not depend on:  pip install peft

    python examples/peft_interop.py           # 30 training steps on the built-in task, then both directions
    python examples/peft_interop.py --fast    # 3 training steps

Both directions score the same texts with each library and print the largest reward difference (float32 rounding,
about 1e-7). A check with an untrained adapter would pass vacuously (LoRA starts with B = 0, so the adapted model
IS the base model), so each direction also prints how far the adapter moves the rewards from the base model's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import peft

from lora_rm import load_adapter
from lora_rm.builtin import BUILTIN_TRAIN_DEFAULTS
from lora_rm.config import TrainConfig
from lora_rm.evaluate import score_texts
from lora_rm.model_io import load_model_and_tokenizer
from lora_rm.train import train

TEXTS = [f"What is {a} + {b} ? {answer}" for a, b in [(3, 4), (9, 9), (0, 5)] for answer in (a + b, (a + b + 3) % 19)]


def max_abs_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def lora_rm_to_peft(folder: Path, steps: int, max_rows: int | None) -> tuple[float, float]:
    """Train with lora-rm, load the folder with PeftModel.from_pretrained; (diff vs lora-rm, shift from base)."""
    settings = {**BUILTIN_TRAIN_DEFAULTS, "max_steps": steps, "max_rows": max_rows}
    train(TrainConfig(output=str(folder), overwrite=True, progress=False, **settings))
    base, tokenizer = load_model_and_tokenizer("builtin")
    base_rewards = score_texts(base.eval(), tokenizer, TEXTS)
    theirs = peft.PeftModel.from_pretrained(base, folder).eval()  # wraps `base` in place
    ours, _ = load_model_and_tokenizer("builtin")  # the built-in base is rebuilt identically from its seed
    load_adapter(ours, folder).eval()
    ours_rewards, theirs_rewards = score_texts(ours, tokenizer, TEXTS), score_texts(theirs, tokenizer, TEXTS)
    return max_abs_diff(ours_rewards, theirs_rewards), max_abs_diff(ours_rewards, base_rewards)


def peft_to_lora_rm(folder: Path) -> tuple[float, float]:
    """A PEFT adapter with random A and B, save_pretrained, lora_rm.load_adapter; the same two numbers."""
    base, tokenizer = load_model_and_tokenizer("builtin")
    base_rewards = score_texts(base.eval(), tokenizer, TEXTS)
    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,  # B random, not zero: a non-trivial adapter without training
    )
    theirs = peft.get_peft_model(base, config).eval()
    theirs.save_pretrained(folder)  # adapter_model.safetensors + adapter_config.json, score head included
    ours, _ = load_model_and_tokenizer("builtin")
    load_adapter(ours, folder).eval()
    ours_rewards, theirs_rewards = score_texts(ours, tokenizer, TEXTS), score_texts(theirs, tokenizer, TEXTS)
    return max_abs_diff(ours_rewards, theirs_rewards), max_abs_diff(theirs_rewards, base_rewards)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Round-trip adapters both ways; returns the two max abs reward differences and the two shifts from base."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/peft_interop", help="the two adapter folders go here")
    parser.add_argument("--steps", type=int, default=30, help="lora-rm training steps before the PEFT load")
    parser.add_argument("--fast", action="store_true", help="3 training steps, for the tests")
    args = parser.parse_args(argv)
    output = Path(args.output)

    steps, max_rows = (3, 100) if args.fast else (args.steps, None)
    to_peft, to_peft_shift = lora_rm_to_peft(output / "from_lora_rm", steps, max_rows)
    print(f"lora-rm -> PEFT: max abs reward diff {to_peft:.2e} (adapter moves rewards by {to_peft_shift:.3f})")
    from_peft, from_peft_shift = peft_to_lora_rm(output / "from_peft")
    print(f"PEFT -> lora-rm: max abs reward diff {from_peft:.2e} (adapter moves rewards by {from_peft_shift:.3f})")
    shifts = {"to_peft_shift": to_peft_shift, "from_peft_shift": from_peft_shift}
    return {"to_peft": to_peft, "from_peft": from_peft, **shifts}


if __name__ == "__main__":
    main()
