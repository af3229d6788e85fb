"""The `lora-rm` command: argparse flags -> dataclasses -> train / eval / score / merge."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import distributed
from .adapter_io import load_adapter
from .config import ALL_LINEAR, LoraConfig, TrainConfig
from .inject import merge_lora
from .train import BUILTIN, evaluate_rows, load_model_and_tokenizer, load_rows, score_texts, train

# The README's main job: `lora-rm train` with no flags trains the built-in task in about 10 s on 2 cores.
BUILTIN_TRAIN_DEFAULTS = dict(lr=2e-3, epochs=3.0, batch_size=16, max_length=32, log_every=20, eval_every=50)


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Flags mirror TrainConfig fields; a flag left out keeps the dataclass default."""
    add = parser.add_argument
    add("--model", default=BUILTIN, help="hub id or local folder; 'builtin' (default) builds a tiny offline model")
    add("--dataset", default=BUILTIN, help="hub id, local .json/.jsonl(.gz)/.parquet/.csv file or folder, 'builtin'")
    add("--eval-dataset", help="held-out preferences; default: the last --eval-fraction of --dataset")
    add("--output", help="folder for adapter, log.jsonl and checkpoints/ (default runs/builtin)")
    add("--split", help="split of --dataset, e.g. train or 'train[:1800]' (default train)")
    add("--eval-split", help="split of --eval-dataset, e.g. test or 'train[-512:]' (default test)")
    add("--eval-fraction", type=float)
    add("--rows", help="a slice of the training rows as text, e.g. ':1800'")
    add("--eval-rows", help="a slice of the eval rows as text, e.g. '-512:' for the last 512")
    add("--max-pairs", type=int, help="keep the first N training rows")
    add("--max-eval-pairs", type=int, help="keep the first N eval rows")
    # --lora-r for torchrun: its own parser rejects "--r" as an ambiguous abbreviation of --rdzv-*/--role
    add("--r", "--lora-r", dest="r", type=int, default=16, help="LoRA rank (default 16)")
    add("--lora-alpha", type=float, default=32)
    add("--lora-dropout", type=float, default=0.0)
    add("--target-modules", default=ALL_LINEAR, help="'all-linear' or a comma-separated list: q_proj,v_proj")
    add("--use-rslora", action="store_true", help="scale by alpha/sqrt(r)")
    add("--max-length", type=int, help="tokens per side (default 512)")
    add("--length-policy", choices=["drop", "truncate_left"], help="for pairs over --max-length (default drop)")
    add("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of stopping")
    add("--batch-size", type=int, help="pairs per device per micro-batch (default 8)")
    add("--grad-accum", type=int)
    add("--lr", type=float, help="peak learning rate (default 1e-4)")
    add("--head-lr", type=float, help="peak learning rate of the score head (default --lr)")
    add("--weight-decay", type=float)
    add("--lr-schedule", choices=["linear", "cosine"])
    add("--warmup-ratio", type=float)
    add("--epochs", type=float)
    add("--max-steps", type=int)
    add("--max-grad-norm", type=float)
    add("--center-rewards-coefficient", type=float)
    add("--group-by-length", action="store_true")
    add("--gradient-checkpointing", action="store_true")
    add("--reentrant-checkpointing", action="store_true")
    add("--fsdp", action="store_true", help="under torchrun: shard the model with FSDP2 instead of DDP")
    add("--bf16", action="store_true", help="bf16 autocast")
    add("--fp16", action="store_true", help="fp16 autocast with a grad scaler (CUDA)")
    add("--seed", type=int)
    add("--log-every", type=int)
    add("--eval-every", type=int)
    add("--save-every", type=int)
    add("--keep-checkpoints", type=int)
    add("--resume", action="store_true", help="continue from the latest checkpoint in OUTPUT/checkpoints")
    add("--overwrite", action="store_true", help="replace a run already in --output")
    add("--device")
    add("--trust-remote-code", action="store_true", help="run model code from the hub (off unless asked)")
    add("--no-progress", action="store_true")


LORA_FLAGS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Turn parsed flags into a TrainConfig; only flags the user gave override the defaults."""
    given = {k: v for k, v in vars(args).items() if v is not None and v is not False}
    for name in (*LORA_FLAGS, "command", "bf16", "fp16", "no_progress"):
        given.pop(name, None)
    if args.model == BUILTIN:
        given = {**BUILTIN_TRAIN_DEFAULTS, **given}
    target_modules = args.target_modules if args.target_modules == ALL_LINEAR else args.target_modules.split(",")
    lora = LoraConfig(
        r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=target_modules,
        use_rslora=args.use_rslora, base_model_name_or_path=None if args.model == BUILTIN else args.model,
    )
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    return TrainConfig(**given, lora=lora, precision=precision, progress=not args.no_progress)


def run_train(args: argparse.Namespace) -> None:
    with distributed.process_group():  # under torchrun train() joins the group; it is torn down here
        metrics = train(train_config_from_args(args))
        distributed.print_main(json.dumps({k: v for k, v in metrics.items() if k != "reward_stats"}))


def load_reward_model(model_name: str, adapter: str, trust_remote_code: bool = False):
    """Base model + saved adapter, in eval mode."""
    model, tokenizer = load_model_and_tokenizer(model_name, trust_remote_code)
    return load_adapter(model, adapter).eval(), tokenizer


def run_eval(args: argparse.Namespace) -> None:
    model, tokenizer = load_reward_model(args.model, args.adapter, args.trust_remote_code)
    model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = load_rows(args.dataset, args.split, args.max_pairs, args.rows, seed=args.seed)
    metrics, stats, written = evaluate_rows(
        model, tokenizer, rows, args.max_length, args.length_policy, args.skip_bad_rows, args.batch_size,
        args.report, args.log,
    )
    print(f"eval pairs: {stats}", file=sys.stderr)
    print(json.dumps(metrics))
    if written:
        print(f"report: {', '.join(str(path) for path in written)}", file=sys.stderr)


def read_score_inputs(path: str | None) -> list:
    """Texts to score: JSONL lines with "text" (a string) or "messages" (a chat), or plain text lines."""
    lines = (Path(path).read_text() if path and path != "-" else sys.stdin.read()).splitlines()
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            items.append(line)
            continue
        if isinstance(record, dict) and ("text" in record or "messages" in record):
            items.append(record.get("text", record.get("messages")))
        elif isinstance(record, dict):
            raise ValueError(f"score input line {number}: a JSON object needs a 'text' or 'messages' field")
        else:
            items.append(line)  # e.g. "42": plain text that happens to parse as JSON
    return items


@torch.no_grad()
def run_score(args: argparse.Namespace) -> None:
    model, tokenizer = load_reward_model(args.model, args.adapter, args.trust_remote_code)
    for reward in score_texts(model, tokenizer, read_score_inputs(args.input), args.max_length):
        print(f"{reward:.6f}")


def run_merge(args: argparse.Namespace) -> None:
    model, tokenizer = load_reward_model(args.model, args.adapter, args.trust_remote_code)
    merged = merge_lora(model)
    merged.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"merged model written to {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-rm", description="LoRA reward models in plain PyTorch")
    commands = parser.add_subparsers(dest="command")
    add_train_flags(commands.add_parser("train", help="train a reward model (no flags: the built-in demo)"))
    for name, help_text in [("eval", "accuracy and margins on preference pairs"), ("score", "one reward per text"),
                            ("merge", "fold the adapter into a plain HF model")]:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--model", default=BUILTIN)
        sub.add_argument("--adapter", required=True, help="folder with adapter_config.json (ours or PEFT's)")
        sub.add_argument("--trust-remote-code", action="store_true")
        sub.add_argument("--max-length", type=int, default=512)
        if name == "eval":
            sub.add_argument("--dataset", default=BUILTIN)
            sub.add_argument("--split", default="train")
            sub.add_argument("--seed", type=int, default=1, help="seed of the built-in task (default 1: unseen pairs)")
            sub.add_argument("--rows", help="a slice of the rows as text, e.g. '-512:' for the last 512")
            sub.add_argument("--max-pairs", type=int)
            sub.add_argument("--length-policy", choices=["drop", "truncate_left"], default="drop")
            sub.add_argument("--skip-bad-rows", action="store_true")
            sub.add_argument("--batch-size", type=int, default=8)
            sub.add_argument("--device")
            sub.add_argument("--report", help="folder for the reward report (PNG plots; needs lora-rm[plot])")
            sub.add_argument("--log", help="a training log.jsonl to plot loss and accuracy curves from")
        if name == "score":
            sub.add_argument("--input", help="JSONL ('text' or 'messages') or plain text lines; default stdin")
        if name == "merge":
            sub.add_argument("--output", required=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return
    {"train": run_train, "eval": run_eval, "score": run_score, "merge": run_merge}[args.command](args)


if __name__ == "__main__":
    main()
