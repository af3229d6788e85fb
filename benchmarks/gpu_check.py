"""The first GPU run, as one prepared script: overhead suite, memory ladder and two short trainings, one table.

    python -m benchmarks.gpu_check                  # on one CUDA GPU, ~5-8 minutes
    python -m benchmarks.gpu_check --smoke          # the same steps, tiny, on any machine (the test runs this)

1. the overhead suite in bf16 on Qwen2.5-0.5B's shape at 1024 tokens a sequence (floor, lora-rm, PEFT, r=8 and
   r=64, with and without checkpointing; transformers' default SDPA attention);
2. the memory ladder (fp32 / bf16 / nf4 base, lora-rm beside PEFT);
3. `lora-rm train` for 50 steps with --base-dtype bf16 and 50 with --load-in-4bit, on the built-in arithmetic
   task with a random-init 0.5B-shaped base (no network on the GPU machine: this proves the path, not quality).
Everything lands in OUT/ (default benchmarks/results/gpu): each step's own JSON and gpu_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from .overhead import REPO_ROOT


def run(command: list[str], log: Path) -> float:
    """Run a step as its own process (a crash in one step leaves the others' results); seconds it took."""
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed; see {log}")
    return time.perf_counter() - started


def save_model_folder(folder: Path, smoke: bool) -> None:
    """A random-init Qwen2.5-0.5B-shaped reward model with the built-in tokenizer, for `lora-rm train --model`."""
    from transformers import AutoModelForSequenceClassification, Qwen2Config

    from lora_rm.builtin import builtin_tokenizer

    tokenizer = builtin_tokenizer()
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if smoke else dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14)
    config = Qwen2Config(**shape, num_key_value_heads=2, vocab_size=len(tokenizer), num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, max_position_embeddings=256)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "gpu"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (not a GPU run)"
    if args.smoke:
        overhead = ["--model", "tiny", "--seq-len", "16", "--pairs", "1", "--ranks", "2", "--repeats", "1",
                    "--warmup", "0"]
        ladder, steps = ["--tiny", "--pairs", "1", "--seq-len", "8"], "3"
    else:
        overhead = ["--model", "0.5b", "--seq-len", "1024", "--pairs", "4", "--ranks", "8", "64", "--repeats", "10",
                    "--dtype", "bf16"]
        ladder, steps = ["--pairs", "4", "--seq-len", "512"], "50"
    seconds = {}
    seconds["overhead"] = run([python, "-m", "benchmarks.overhead", *overhead, "--out", str(out / "overhead")],
                              out / "overhead.log")
    seconds["memory"] = run([python, "-m", "benchmarks.memory", *ladder, "--out", str(out / "memory")],
                            out / "memory.log")
    model = out / "model-0.5b-shape"
    save_model_folder(model, args.smoke)
    trainings = {}
    for name, flags in [("bf16", ["--base-dtype", "bf16", "--precision", "bf16"]),
                        ("nf4", ["--load-in-4bit", "--precision", "bf16"])]:
        if name == "nf4" and args.smoke and device == "cpu":
            flags = ["--load-in-4bit"]  # bf16 autocast over a 4-bit layer on CPU: slow, and nothing to learn here
        run_dir = out / f"train-{name}"
        command = [python, "-m", "lora_rm", "train", "--model", str(model), "--max-steps", steps, "--batch-size", "8",
                   "--max-length", "32", "--log-every", "10", "--output", str(run_dir), "--overwrite",
                   "--no-progress", *flags]
        seconds[f"train-{name}"] = run(command, out / f"train-{name}.log")
        records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        pairs_per_s = [record["pairs_per_s"] for record in records if "pairs_per_s" in record][-1]
        trainings[name] = {**json.loads((run_dir / "eval_metrics.json").read_text()), "pairs_per_s": pairs_per_s}
    overhead_rows = json.loads((out / "overhead.json").read_text())["rows"]
    memory_rows = json.loads((out / "memory.json").read_text())["rows"]
    summary = {"card": card, "torch": torch.__version__, "seconds": seconds, "overhead": overhead_rows,
               "memory": memory_rows, "trainings": trainings}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# GPU check on {card} (torch {torch.__version__})", "",
             (out / "overhead.log").read_text().split("\n\n")[0], "", (out / "memory.md").read_text(), "",
             "| training | accuracy | pairs/s | seconds |", "|---|---|---|---|"]
    for name, metrics in trainings.items():
        lines.append(f"| {name} | {metrics['accuracy']:.3f} | {metrics['pairs_per_s']:.1f} | "
                     f"{seconds[f'train-{name}']:.0f} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
