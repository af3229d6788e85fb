"""The `lora-rm` command: flags generated from TrainConfig's fields -> train / eval / score / merge.

Every flag of `train` is a TrainConfig (or LoraConfig) field with that field's default and help text, so the
two cannot drift. torch, transformers and the training code are imported by the command that needs them, so
`--help` answers at once. Errors print one line, `lora-rm: error: ...` (exit 1); --debug or LORA_RM_DEBUG=1
shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import typing
from pathlib import Path
from typing import Any

from .builtin import BUILTIN_TRAIN_DEFAULTS
from .config import ALL_LINEAR, BUILTIN, LoraConfig, TrainConfig

LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora")  # LoraConfig on the command line
# What eval/score/merge take from TrainConfig's flags (same names, same defaults).
EVAL_FIELDS = ("model", "dataset", "split", "rows", "max_rows", "max_length", "length_policy", "skip_bad_rows",
               "batch_size", "device", "trust_remote_code")
SCORE_FIELDS = ("model", "max_length", "batch_size", "device", "trust_remote_code")
MERGE_FIELDS = ("model", "device", "trust_remote_code")


def add_field_flags(parser: argparse.ArgumentParser, config_class: type, names: list[str] | tuple[str, ...],
                    defaults: Any, builtin_defaults: dict[str, Any] | None = None) -> None:
    """One --flag per named dataclass field, typed from its annotation, with its help text and real default."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    for name in names:
        hint = hints[name]
        options = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]  # X | None -> X
        kind = str if str in options else options[0]  # target_modules: list[str] | str, given as text
        default = getattr(defaults, name)
        help_text = f"{fields[name].metadata['help']} (default: {'unset' if default is None else default}"
        if builtin_defaults and name in builtin_defaults:
            help_text += f"; {builtin_defaults[name]} with --model builtin"
        flags = [f"--{name.replace('_', '-')}"]
        if name == "r":  # torchrun's own parser rejects "--r" as an ambiguous abbreviation of --rdzv-*/--role
            flags.append("--lora-r")
        if kind is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, help=help_text + ")")
        else:
            choices = fields[name].metadata.get("choices")
            parser.add_argument(*flags, dest=name, type=kind, choices=choices, metavar=None if choices else
                                kind.__name__.upper(), help=help_text + ")")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The flags the user gave over TrainConfig's defaults (over BUILTIN_TRAIN_DEFAULTS for the built-in model)."""
    given = {name: value for name, value in vars(args).items() if name not in ("command", "debug")}
    lora_given = {name: given.pop(name) for name in LORA_FIELDS if name in given}
    if isinstance(lora_given.get("target_modules"), str) and lora_given["target_modules"] != ALL_LINEAR:
        lora_given["target_modules"] = lora_given["target_modules"].split(",")
    model = given.get("model", BUILTIN)
    if model == BUILTIN:
        given = {**BUILTIN_TRAIN_DEFAULTS, **given}
    base_name = None if model == BUILTIN else model
    lora = dataclasses.replace(TrainConfig().lora, **lora_given, base_model_name_or_path=base_name)
    return TrainConfig(**given, lora=lora)


def given_or_default(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """TrainConfig's defaults for `names`, overridden by the flags given."""
    defaults = TrainConfig()
    return {name: getattr(args, name, getattr(defaults, name)) for name in names}


def run_train(args: argparse.Namespace) -> None:
    from . import distributed
    from .train import train

    with distributed.process_group():  # under torchrun train() joins the group; it is torn down here
        metrics = train(train_config_from_args(args))
        distributed.print_main(json.dumps({k: v for k, v in metrics.items() if k != "reward_stats"}))


def load_for_command(args: argparse.Namespace, settings: dict[str, Any]):
    """The base model with the saved adapter, on the requested device: (model, tokenizer)."""
    import torch

    from .scoring import load_reward_model

    model, tokenizer = load_reward_model(settings["model"], args.adapter, settings["trust_remote_code"])
    device = settings["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), tokenizer


def run_eval(args: argparse.Namespace) -> None:
    from .data import load_preference_dataset
    from .scoring import evaluate_dataset

    settings = given_or_default(args, EVAL_FIELDS)
    model, tokenizer = load_for_command(args, settings)
    dataset = load_preference_dataset(settings["dataset"], settings["split"], settings["max_rows"], settings["rows"],
                                      seed=args.seed)
    metrics, stats, written = evaluate_dataset(
        model, tokenizer, dataset, settings["max_length"], settings["length_policy"], settings["skip_bad_rows"],
        settings["batch_size"], args.report, args.log,
    )
    print(f"eval pairs: {stats}", file=sys.stderr)
    finite_metrics = finite_or_none(metrics)
    print(json.dumps(finite_metrics, allow_nan=False))  # strict JSON: a NaN would make the line unreadable
    if written:
        print(f"report: {', '.join(str(path) for path in written)}", file=sys.stderr)
    if finite_metrics != metrics:
        raise SystemExit("lora-rm: error: some metrics are NaN or inf (printed as null): the adapter's rewards are "
                         "not finite, e.g. saved from a diverged run")


def finite_or_none(value: Any) -> Any:
    """The value with every NaN or inf float (in nested dicts and lists) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(item) for item in value]
    return value


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


def run_score(args: argparse.Namespace) -> None:
    from .scoring import score_texts

    settings = given_or_default(args, SCORE_FIELDS)
    model, tokenizer = load_for_command(args, settings)
    inputs = read_score_inputs(args.input)
    for reward in score_texts(model, tokenizer, inputs, settings["max_length"], settings["batch_size"]):
        print(f"{reward:.6f}")


def run_merge(args: argparse.Namespace) -> None:
    from .inject import merge_lora

    model, tokenizer = load_for_command(args, given_or_default(args, MERGE_FIELDS))
    merged = merge_lora(model)
    merged.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"merged model written to {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-rm", description="LoRA reward models in plain PyTorch",
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", default=False, help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command")
    defaults = TrainConfig()
    train = commands.add_parser("train", help="train a reward model (no flags: the built-in demo, ~10 s)",
                                argument_default=argparse.SUPPRESS)
    train_fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "lora"]
    add_field_flags(train, TrainConfig, train_fields, defaults, BUILTIN_TRAIN_DEFAULTS)
    add_field_flags(train, LoraConfig, LORA_FIELDS, defaults.lora)
    for name, help_text, fields in [
        ("eval", "accuracy and margins on preference pairs", EVAL_FIELDS),
        ("score", "one reward per text", SCORE_FIELDS),
        ("merge", "fold the adapter into a plain HF model", MERGE_FIELDS),
    ]:
        sub = commands.add_parser(name, help=help_text, argument_default=argparse.SUPPRESS)
        sub.add_argument("--adapter", required=True, help="folder with adapter_config.json (ours or PEFT's)")
        add_field_flags(sub, TrainConfig, fields, defaults)
        if name == "eval":
            sub.add_argument("--seed", type=int, default=1, help="seed of the built-in task (default 1: unseen pairs)")
            sub.add_argument("--report", default=None, help="folder for the reward report (PNGs; needs lora-rm[plot])")
            sub.add_argument("--log", default=None, help="a training log.jsonl to plot loss and accuracy curves from")
        if name == "score":
            sub.add_argument("--input", default=None, help="JSONL ('text' or 'messages') or plain lines; default stdin")
        if name == "merge":
            sub.add_argument("--output", required=True, help="folder for the merged model and its tokenizer")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = getattr(args, "command", None)
    if command is None:
        parser.print_help()
        return
    run = {"train": run_train, "eval": run_eval, "score": run_score, "merge": run_merge}[command]
    if args.debug or os.environ.get("LORA_RM_DEBUG"):
        run(args)
        return
    try:
        run(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, OSError, RuntimeError) as error:
        raise SystemExit(f"lora-rm: error: {error}") from None


if __name__ == "__main__":
    main()
