"""Training throughput of the packing modes (lora_rm/packing.py) beside TRL's RewardTrainer + PEFT.

    python -m benchmarks.throughput                     # the README protocol: 2 backbones x 4 lora-rm runs + 2 TRL
    python -m benchmarks.throughput --smoke             # tiny models, 16 short pairs, one process: checks the script

Protocol (README, "lora-rm vs TRL's RewardTrainer on real data"): the first --train-pairs rows of HH-RLHF
harmless-base test, --max-length 256 (longer pairs dropped), r=16, alpha=32, lr 1e-4, 1 epoch, batch 8, fp32.
Backbones: "decoder", a Llama-shaped model of MiniLM's size (hidden 384, 6 layers, 12 heads, intermediate 1536,
random init, MiniLM's tokenizer; LoRA on every linear layer) and "minilm", MiniLM-L6 itself (query/key/value/dense).
Runs per backbone: TRL, lora-rm padded (ungrouped and --group-by-length) and each packed mode (grouped; for MiniLM,
an encoder, shared_prompt falls back to padding_free and is not run). Each run is its own child process, so peak
memory (CUDA: max allocated; CPU: peak RSS) is that run's. Tokens computed per pair are counted from the epoch's
batches as each mode lays them out, row padding included (padded: 2 x batch x longest side per batch; packed:
rows x width, lora_rm.packing.layout_tokens). Pairs/s: training loop only.
Writes OUT.json and OUT.md (default benchmarks/results/throughput) and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results", "throughput")
DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MINILM_TARGETS = ["query", "key", "value", "dense"]
LORA_RM_RUNS = [("none", False), ("none", True), ("padding_free", True), ("shared_prompt", True)]


def minilm_path() -> str:
    from .trl_baseline import MINILM

    return MINILM


def build_backbones(folder: Path, smoke: bool) -> dict[str, dict[str, Any]]:
    """Model folders (config, random-init weights, MiniLM's tokenizer) with their LoRA targets."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4) if smoke else \
        dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12)
    common = dict(vocab_size=len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id)
    configs = {"decoder": LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], **common)}
    if smoke:  # MiniLM's architecture at toy size; the real run loads MiniLM itself
        configs["minilm"] = BertConfig(**shape, max_position_embeddings=512, **common)
    backbones = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        path = folder / name
        AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        backbones[name] = {"model": str(path)}
    backbones["decoder"]["targets"] = DECODER_TARGETS
    backbones.setdefault("minilm", {"model": minilm_path()})["targets"] = MINILM_TARGETS
    return backbones


def peak_mib() -> float:
    """This process's peak: CUDA max allocated, else the peak resident set (Linux reports KiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tokens_per_pair(pairs: list[dict], config) -> float:
    """Tokens the epoch's micro-batches compute per pair in this run's layout."""
    from lora_rm import data, packing

    batches = data.batch_indices([p["length"] for p in pairs], config.batch_size, config.seed, 0,
                                 config.group_by_length)
    total = 0
    for batch in batches:
        groups = packing.pair_groups([pairs[i] for i in batch])
        if config.packing == "none":
            total += 2 * len(batch) * max(len(side) for group in groups for side in group)
        else:
            total += packing.layout_tokens(groups, config.packing == "shared_prompt")
    return total / sum(len(batch) for batch in batches)


def run_lora_rm(spec: dict[str, Any]) -> dict[str, Any]:
    """One lora-rm training run (in this child process): pairs/s of the loop, tokens per pair, peak memory."""
    from lora_rm import data, model_io
    from lora_rm.config import LoraConfig, TrainConfig
    from lora_rm.train import train

    with tempfile.TemporaryDirectory() as output:
        config = TrainConfig(
            model=spec["model"], dataset=spec["data"], rows=f":{spec['train_pairs']}", eval_dataset=spec["data"],
            eval_rows=f"-{spec['eval_pairs']}:", max_length=spec["max_length"], batch_size=spec["batch_size"],
            lr=1e-4, epochs=1.0, group_by_length=spec["group_by_length"], packing=spec["packing"],
            lora=LoraConfig(r=spec["r"], lora_alpha=2 * spec["r"], target_modules=spec["targets"]),
            output=output, overwrite=True, progress=False, log_every=10_000,
        )
        final = train(config)
        log = [json.loads(line) for line in Path(output, "log.jsonl").read_text().splitlines()]
    pairs_per_s = [line["pairs_per_s"] for line in log if "pairs_per_s" in line][-1]
    tokenizer = model_io.load_tokenizer(spec["model"])
    rows = data.load_preference_dataset(spec["data"], rows=f":{spec['train_pairs']}")
    pairs = data.tokenize_pairs(rows, tokenizer, spec["max_length"])[0].to_list()
    return {"pairs_per_s": pairs_per_s, "tokens_per_pair": tokens_per_pair(pairs, config), "peak_mib": peak_mib(),
            "train_pairs": len(pairs), "eval_accuracy": final["accuracy"]}


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """One TRL RewardTrainer + PEFT run (in this child process), as benchmarks/trl_baseline.py runs it."""
    from datasets import load_dataset

    from .trl_baseline import train_trl

    rows = load_dataset("json", data_files=spec["data"], split="train")
    train_rows = rows.select(range(spec["train_pairs"]))
    eval_rows = rows.select(range(len(rows) - spec["eval_pairs"], len(rows)))
    run = train_trl(spec["model"], train_rows, eval_rows, spec["max_length"], 42, spec["batch_size"],
                    targets=spec["targets"], r=spec["r"])
    return {"pairs_per_s": run["train_pairs_per_s"], "tokens_per_pair": None, "peak_mib": peak_mib(),
            "train_pairs": run["train_pairs_kept"], "eval_accuracy": run["own_accuracy"]}


def in_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one spec in a fresh process (its own peak memory) and read back its JSON line."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--child", json.dumps(spec)], cwd=root,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run {spec['name']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_smoke_data(path: Path, n_pairs: int) -> str:
    """Implicit pairs in HH-RLHF's shape (the conversation up to the last answer shared), a few tokens each."""
    rows = [{"chosen": f"\n\nHuman: what is {i} plus {i}?\n\nAssistant: it is {2 * i}.",
             "rejected": f"\n\nHuman: what is {i} plus {i}?\n\nAssistant: no idea, sorry."} for i in range(n_pairs)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def ratio(a: dict | None, b: dict | None) -> float | None:
    return round(a["pairs_per_s"] / b["pairs_per_s"], 2) if a and b else None


def goals(rows: list[dict]) -> dict[str, Any]:
    """The issue's speed goals, each with its measured ratio."""
    find = {(r["backbone"], r["name"]): r for r in rows}
    shared = find.get(("decoder", "lora-rm --group-by-length --packing shared_prompt"))
    free = find.get(("minilm", "lora-rm --group-by-length --packing padding_free"))
    grouped = "lora-rm --group-by-length --packing none"
    return {
        "decoder shared_prompt / TRL (goal >= 2.5)": ratio(shared, find.get(("decoder", "TRL"))),
        "decoder shared_prompt / grouped padded (goal >= 1.3)": ratio(shared, find.get(("decoder", grouped))),
        "minilm padding_free / grouped padded (goal >= 1.0)": ratio(free, find.get(("minilm", grouped))),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Throughput, {result['protocol']}", "",
             "| backbone | trainer | train pairs | pairs/s | x TRL | tokens/pair | peak MiB | eval acc |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        trl = next(r for r in result["rows"] if r["backbone"] == row["backbone"] and r["name"] == "TRL")
        tokens = "-" if row["tokens_per_pair"] is None else f"{row['tokens_per_pair']:.0f}"
        lines.append(f"| {row['backbone']} | {row['name']} | {row['train_pairs']} | {row['pairs_per_s']:.2f} | "
                     f"{ratio(row, trl):.2f}x | {tokens} | {row['peak_mib']:.0f} | {row['eval_accuracy']:.3f} |")
    lines += [""] + [f"- {goal}: {value}" for goal, value in result["goals"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    from .trl_baseline import HH_RLHF

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=HH_RLHF)
    parser.add_argument("--train-pairs", type=int, default=1800)
    parser.add_argument("--eval-pairs", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--backbones", nargs="+", default=["decoder", "minilm"], choices=["decoder", "minilm"])
    parser.add_argument("--smoke", action="store_true", help="tiny models, 16 short pairs, all in this process")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(run_trl(spec) if spec["name"] == "TRL" else run_lora_rm(spec)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        if args.smoke:  # short HH-style pairs, every run in this process (peak memory is then cumulative)
            args.train_pairs, args.eval_pairs, args.max_length, args.batch_size, args.r = 12, 4, 64, 4, 2
            args.data = write_smoke_data(Path(folder) / "pairs.jsonl", args.train_pairs + args.eval_pairs)
        backbones = build_backbones(Path(folder), args.smoke)
        for backbone in args.backbones:
            base = dict(data=args.data, train_pairs=args.train_pairs, eval_pairs=args.eval_pairs,
                        max_length=args.max_length, batch_size=args.batch_size, r=args.r, **backbones[backbone])
            specs = [{**base, "name": "TRL"}]
            for mode, grouped in LORA_RM_RUNS:
                if backbone == "minilm" and mode == "shared_prompt":
                    continue  # an encoder: shared_prompt is padding_free
                name = f"lora-rm {'--group-by-length ' if grouped else ''}--packing {mode}"
                specs.append({**base, "name": name, "packing": mode, "group_by_length": grouped})
            for spec in specs:
                started = time.perf_counter()
                measured = (run_trl if spec["name"] == "TRL" else run_lora_rm)(spec) if args.smoke else in_child(spec)
                row = {"backbone": backbone, "name": spec["name"], **measured}
                print(f"{backbone} {spec['name']}: {row['pairs_per_s']:.2f} pairs/s "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
                rows.append(row)
    protocol = (f"HH-RLHF first {args.train_pairs} pairs, max length {args.max_length}, r={args.r}, batch "
                f"{args.batch_size}, 1 epoch, {'cuda' if torch.cuda.is_available() else 'cpu'}"
                f"{' (smoke: tiny models)' if args.smoke else ''}")
    result = {"protocol": protocol, "rows": rows, "goals": goals(rows)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
