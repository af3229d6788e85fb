"""The `lora-rm` command: flags generated from TrainConfig's fields -> train / eval / score / merge / push.

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
import re
import shlex
import sys
import typing
from pathlib import Path
from typing import Any

from .builtin import BUILTIN_TRAIN_DEFAULTS
from .config import ALL_LINEAR, BUILTIN, LoraConfig, ServeConfig, TrainConfig

BENCHMARKS = ("rewardbench", "rewardbench2")  # eval --benchmark: lora_rm/rewardbench.py (imported lazily)

LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora",  # LoraConfig flags
               "init_lora_weights", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern")
PATTERN_FIELDS = ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern")  # text, parse_pattern_flags
# What eval/score/merge take from TrainConfig's flags (same names, same defaults).
LOAD_FIELDS = ("model", "base_dtype", "load_in_4bit", "bnb_4bit_compute_dtype", "device", "trust_remote_code",
               "allow_pickle_weights")
EVAL_FIELDS = (*LOAD_FIELDS, "dataset", "split", "rows", "max_rows", "max_length", "length_policy", "skip_bad_rows",
               "batch_size", "packing", "max_tokens_per_batch")
SCORE_FIELDS = (*LOAD_FIELDS, "max_length", "batch_size", "packing", "progress")
SERVE_FIELDS = (*LOAD_FIELDS, "max_length", "packing")  # score's, with batching by ServeConfig's fields instead
# Where a TrainConfig help text speaks of training, what the flag means to eval and score.
COMMAND_HELP = {
    "eval": {"rows": "a slice of the rows to evaluate as text, e.g. '-512:' (applied before max_rows)",
             "max_rows": "keep the first N rows to evaluate (after rows)",
             "batch_size": "pairs per forward"},
    "score": {"batch_size": "texts per forward"},
}
REPEATABLE_FIELDS = ("eval_dataset",)  # a flag given more than once makes a list (one given once: its value)
NEGATIVE_VALUE = re.compile(r"-\.?\d")  # "-512:" (a slice), "-1e-4": argparse takes them for flags
USAGE_EXIT, FAILURE_EXIT = 2, 1


def one_line_error(message: str) -> str:
    """`lora-rm: error: ...` on one line, with config field names written as the flags that set them."""
    message = re.sub(r"\b(?:TrainConfig|LoraConfig|ServeConfig)\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"),
                     message)
    message = message.replace("--r ", "--lora-r ")
    return "lora-rm: error: " + " ".join(message.split())


def usage_error(message: str) -> typing.NoReturn:
    print(one_line_error(message), file=sys.stderr)
    raise SystemExit(USAGE_EXIT)


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit 2) instead of the usage block."""

    def error(self, message: str) -> typing.NoReturn:
        usage_error(f"{message} (see `{self.prog} --help`)")


def join_negative_values(argv: list[str]) -> list[str]:
    """`--rows -5:` -> `--rows=-5:` (and `--head-lr -1e-4`), so a value that starts with "-" is read as a value."""
    joined = []
    for token in argv:
        previous = joined[-1] if joined else ""
        if NEGATIVE_VALUE.match(token) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={token}"
        else:
            joined.append(token)
    return joined


def add_field_flags(parser: argparse.ArgumentParser, config_class: type, names: list[str] | tuple[str, ...],
                    defaults: Any, builtin_defaults: dict[str, Any] | None = None,
                    help_texts: dict[str, str] | None = None) -> None:
    """One --flag per named dataclass field, typed from its annotation, with its help text (or the command's own,
    help_texts) and real default."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    for name in names:
        hint = hints[name]
        options = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]  # X | None -> X
        kind = str if str in options or name in PATTERN_FIELDS else options[0]  # target_modules: given as text
        default = getattr(defaults, name)
        field_help = (help_texts or {}).get(name, fields[name].metadata["help"])
        help_text = f"{field_help} (default: {'unset' if default is None else default}"
        if builtin_defaults and name in builtin_defaults:
            help_text += f"; {builtin_defaults[name]} with --model builtin"
        flags = [f"--{name.replace('_', '-')}"]
        if name == "r":  # torchrun's own parser rejects "--r" as an ambiguous abbreviation of --rdzv-*/--role
            flags.append("--lora-r")
        if kind is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, help=help_text + ")")
        elif name in REPEATABLE_FIELDS:
            parser.add_argument(*flags, dest=name, action="append", metavar="STR", help=help_text + ")")
        else:
            choices = fields[name].metadata.get("choices")
            parser.add_argument(*flags, dest=name, type=kind, choices=choices, metavar=None if choices else
                                kind.__name__.upper(), help=help_text + ")")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The flags the user gave over TrainConfig's defaults (over BUILTIN_TRAIN_DEFAULTS for the built-in model).

    With --resume, flags not given keep the saved run's values (OUTPUT/train_config.json): `lora-rm train --output
    DIR --resume` continues the run as it was started. With --init-adapter (no --merge-init), LoRA flags not given
    take the adapter's values.
    """
    given = {name: value for name, value in vars(args).items() if name not in ("command", "debug")}
    lora_given = {name: given.pop(name) for name in LORA_FIELDS if name in given}
    for name in REPEATABLE_FIELDS:  # one --eval-dataset stays a string, as train_config.json always held it
        if isinstance(given.get(name), list) and len(given[name]) == 1:
            given[name] = given[name][0]
    if isinstance(lora_given.get("target_modules"), str) and lora_given["target_modules"] != ALL_LINEAR:
        lora_given["target_modules"] = lora_given["target_modules"].split(",")
    lora_given.update(parse_pattern_flags(lora_given))
    if str(lora_given.get("init_lora_weights")).lower() in ("true", "false"):  # text on the command line
        lora_given["init_lora_weights"] = str(lora_given["init_lora_weights"]).lower() == "true"
    saved = saved_train_config(given) if given.get("resume") else None
    if saved is not None:
        lora = dataclasses.replace(saved.lora, **lora_given)
        return dataclasses.replace(saved, **given, lora=lora)
    model = given.get("model", BUILTIN)
    if model == BUILTIN:
        given = {**BUILTIN_TRAIN_DEFAULTS, **given}
    base_name = None if model == BUILTIN else model
    lora = dataclasses.replace(lora_defaults(given), **lora_given, base_model_name_or_path=base_name)
    return TrainConfig(**given, lora=lora)


def lora_defaults(given: dict[str, Any]) -> LoraConfig:
    """TrainConfig's LoRA settings; from --init-adapter a reward adapter's own (flags given still win, and a
    conflicting one is refused when the run starts)."""
    if not given.get("init_adapter") or given.get("merge_init"):
        return TrainConfig().lora
    from .warm_start import init_lora_config

    try:
        return init_lora_config(given["init_adapter"])
    except FileNotFoundError as error:  # a usage error, as a bad value is
        raise ValueError(f"--init-adapter: {error}") from error


def parse_pattern_flags(lora_given: dict[str, Any]) -> dict[str, Any]:
    """--rank-pattern/--alpha-pattern as JSON objects, --layers-to-transform '3' or '0,2', --layers-pattern 'h'."""
    parsed = {}
    for name in ("rank_pattern", "alpha_pattern"):
        if name in lora_given:
            flag = f"--{name.replace('_', '-')}"
            try:
                parsed[name] = json.loads(lora_given[name])
            except json.JSONDecodeError as error:
                raise ValueError(f"{flag} must be a JSON object such as '{{\"v_proj\": 16}}' ({error})") from error
            if not isinstance(parsed[name], dict):
                raise ValueError(f"{flag} must be a JSON object such as '{{\"v_proj\": 16}}', got {lora_given[name]!r}")
    if "layers_to_transform" in lora_given:
        text = lora_given["layers_to_transform"]
        try:
            indices = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(
                f"--layers-to-transform must be a layer index or comma-separated indices, got {text!r}"
            ) from None
        parsed["layers_to_transform"] = indices if "," in text else indices[0]
    if "layers_pattern" in lora_given and "," in lora_given["layers_pattern"]:
        parsed["layers_pattern"] = lora_given["layers_pattern"].split(",")
    return parsed


def saved_train_config(given: dict[str, Any]) -> TrainConfig | None:
    """The TrainConfig a run in --output saved, or None when there is none to read."""
    from .run_folder import NOT_SAVED, read_saved_config

    saved = read_saved_config(Path(given.get("output", TrainConfig().output)))
    if saved is None:
        return None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{name: value for name, value in saved.items() if name in known and name not in NOT_SAVED})


def given_or_default(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """TrainConfig's defaults for `names`, overridden by the flags given."""
    defaults = TrainConfig()
    return {name: getattr(args, name, getattr(defaults, name)) for name in names}


def check_settings(args: argparse.Namespace) -> None:
    """Range errors before anything loads: train's TrainConfig, or the TrainConfig fields eval/score/merge take."""
    try:
        if args.command == "train":
            train_config_from_args(args)
        elif args.command != "push":
            fields = {"eval": EVAL_FIELDS, "score": SCORE_FIELDS, "merge": LOAD_FIELDS, "serve": SERVE_FIELDS}
            TrainConfig(**given_or_default(args, fields[args.command]))  # training's rules, e.g. --batch-size >= 1
            if args.command == "serve":
                serve_config_from_args(args)
    except ValueError as error:
        usage_error(str(error))
    if getattr(args, "precision", None) == "fp16" and not on_cuda(getattr(args, "device", None)):
        usage_error("--precision must be bf16 or fp32 without a CUDA device: fp16 autocast (with its grad scaler) "
                    "runs on CUDA only")


def on_cuda(device: str | None) -> bool:
    """Whether a run on --device (unset: CUDA when there is one) runs on CUDA; imports torch only when unset."""
    if device:
        return device.startswith("cuda")
    import torch

    return torch.cuda.is_available()


def settings_in_force(config: TrainConfig) -> str:
    """Model, dataset, output, then every setting that differs from TrainConfig's defaults (flags or builtin's)."""
    def differing(given: Any, default: Any, prefix: str, skip: tuple[str, ...]) -> list[str]:
        return [f"{prefix}{f.name}={getattr(given, f.name)}" for f in dataclasses.fields(given)
                if f.name not in skip and getattr(given, f.name) != getattr(default, f.name)]

    defaults = TrainConfig()
    changed = differing(config, defaults, "", ("model", "dataset", "output", "lora"))
    changed += differing(config.lora, defaults.lora, "lora.", ("base_model_name_or_path",))
    return (f"lora-rm train: model={config.model} dataset={config.dataset} output={config.output}\n"
            f"  settings over the defaults: {' '.join(changed) or 'none'}")


def report_command(config: TrainConfig) -> str:
    """The `lora-rm eval` command that writes the reward report of this run, on its eval data."""
    from .data import hub_or_local_split

    output = Path(config.output)
    words = ["lora-rm", "eval", "--model", config.model, "--adapter", str(output)]
    if config.eval_dataset is not None:  # several: the first (each is logged in log.jsonl)
        first = config.eval_dataset if isinstance(config.eval_dataset, str) else config.eval_dataset[0]
        split = hub_or_local_split(first, config.eval_split, "test")
        words += ["--dataset", first, *(["--split", split] if split else [])]
        words += [f"--rows={config.eval_rows}"] if config.eval_rows else []
        words += ["--max-rows", str(config.max_eval_rows)] if config.max_eval_rows else []
    else:  # built-in: eval's unseen draw, less the rows trained on (data.without_training_rows); else the training rows
        words += ["--dataset", config.dataset, "--split", config.split]
        words += [f"--rows={config.rows}"] if config.rows else []
    words += ["--max-length", str(config.max_length), "--length-policy", config.length_policy]
    words += ["--base-dtype", config.base_dtype] if config.base_dtype != "fp32" else []
    if config.load_in_4bit:
        words += ["--load-in-4bit", "--bnb-4bit-compute-dtype", config.bnb_4bit_compute_dtype]
    words += ["--trust-remote-code"] if config.trust_remote_code else []
    words += ["--allow-pickle-weights"] if config.allow_pickle_weights else []
    words += ["--report", str(output / "report"), "--log", str(output / "log.jsonl")]
    return shlex.join(words)


def where_it_went(config: TrainConfig) -> str:
    output = Path(config.output)
    return "\n".join([
        f"adapter: {output} (adapter_model.safetensors, adapter_config.json, tokenizer, train_config.json, "
        "eval_metrics.json, reward_stats.json)",
        f"log: {output / 'log.jsonl'}",
        f"checkpoints: {output / 'checkpoints'}",
        f"reward report: {report_command(config)}",
    ])


def run_train(args: argparse.Namespace) -> None:
    from . import distributed
    from .train import train

    config = train_config_from_args(args)
    with distributed.process_group():  # under torchrun train() joins the group; it is torn down here
        distributed.print_main(settings_in_force(config), file=sys.stderr)
        metrics = train(config)
        distributed.print_main(json.dumps({k: v for k, v in metrics.items() if k != "reward_stats"}))
        distributed.print_main(where_it_went(config), file=sys.stderr)


def load_for_command(args: argparse.Namespace, settings: dict[str, Any]):
    """The base model with the saved adapter (none: the model as it is), on the requested device: (model, tokenizer)."""
    from .model_io import default_device, load_reward_model

    device = default_device(settings["device"])
    load_options = {name: settings[name] for name in LOAD_FIELDS if name != "model"}
    load_options["device"] = device
    adapter = getattr(args, "adapter", None)
    if not adapter and settings["model"] == BUILTIN:
        raise ValueError(f"{args.command} without --adapter scores --model as it is: give a one-label reward model "
                         "(the built-in demo model is untrained), or an --adapter")
    model, tokenizer = load_reward_model(settings["model"], adapter, **load_options)  # no adapter: the model as it is
    return (model if settings["load_in_4bit"] else model.to(device)), tokenizer


def run_eval(args: argparse.Namespace) -> None:
    from .data import load_preference_dataset, without_training_rows
    from .eval_stats import finite_or_none, read_sections
    from .evaluate import evaluate_benchmark, evaluate_dataset

    settings = given_or_default(args, EVAL_FIELDS)
    if args.benchmark or args.data:
        settings["dataset"] = benchmark_dataset(args)
    sections = read_sections(args.sections) if args.sections else None  # a bad file fails before the model loads
    if args.log and not Path(args.log).is_file():  # checked before the model loads, not after the whole eval
        raise ValueError(f"--log {args.log}: no such file (a training log.jsonl to plot the curves from)")
    if args.predictions and not Path(args.predictions).resolve().parent.is_dir():
        raise ValueError(f"--predictions {args.predictions}: its folder does not exist")
    model, tokenizer = load_for_command(args, settings)
    dataset = load_preference_dataset(settings["dataset"], settings["split"], settings["max_rows"], settings["rows"],
                                      args.seed, settings["skip_bad_rows"])
    dataset = without_training_rows(dataset, settings["dataset"], args.adapter)
    if args.benchmark:
        metrics, stats = evaluate_benchmark(model, tokenizer, dataset, args.benchmark, settings["max_length"],
                                            settings["length_policy"], settings["batch_size"])
        written = []
    else:
        metrics, stats, written = evaluate_dataset(
            model, tokenizer, dataset, settings["max_length"], settings["length_policy"], settings["skip_bad_rows"],
            settings["batch_size"], args.report, args.log, sections, settings["packing"],
            settings["max_tokens_per_batch"], args.predictions,
        )
    print(f"eval pairs: {stats}", file=sys.stderr)
    finite_metrics = finite_or_none(metrics)
    print(json.dumps(finite_metrics, allow_nan=False))  # strict JSON: a NaN would make the line unreadable
    if written:
        print(f"report: {', '.join(str(path) for path in written)}", file=sys.stderr)
    if args.predictions:
        print(f"predictions: {args.predictions}", file=sys.stderr)
    if finite_metrics != metrics:
        raise SystemExit("lora-rm: error: some metrics are NaN or inf (printed as null): the adapter's rewards are "
                         "not finite, e.g. saved from a diverged run")


def benchmark_dataset(args: argparse.Namespace) -> str:
    """The data of `eval --benchmark NAME DATA` (DATA or --dataset); flags a benchmark's fixed rules forbid refused."""
    if args.data and getattr(args, "dataset", args.data) != args.data:
        usage_error(f"eval: DATA {args.data} and --dataset {args.dataset} disagree; give the data once")
    data = args.data or getattr(args, "dataset", None)
    if args.benchmark and not data:
        usage_error(f"eval --benchmark {args.benchmark} needs the benchmark's data: a local file in its published "
                    "schema (DATA or --dataset)")
    for flag, given in (("--sections", args.sections), ("--report", args.report), ("--log", args.log),
                        ("--skip-bad-rows", getattr(args, "skip_bad_rows", False)),
                        ("--rows", getattr(args, "rows", None)), ("--max-rows", getattr(args, "max_rows", None))):
        if args.benchmark and given:
            usage_error(f"eval --benchmark takes no {flag}: the benchmark fixes its sections and scores every row")
    if args.benchmark and args.predictions:
        usage_error("eval --benchmark does not write --predictions; run eval without --benchmark for them")
    return data


def read_score_inputs(path: str | None) -> list:
    """Texts to score: JSONL lines with "text", "messages" (a chat) or "prompt" and "response", or plain text lines."""
    from .scoring import read_rows

    if path and path != "-":
        with open(path, encoding="utf-8", newline="\n") as handle:  # a lone \r is no line end either
            text = handle.read()
    else:
        text = sys.stdin.read()
    return [item for _, _, item in read_rows(text.split("\n"))]  # not splitlines: U+2028 is no line end


def run_score(args: argparse.Namespace) -> None:
    from .evaluate import score_texts

    if args.output:
        run_score_file(args)
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("under torchrun, score needs --input FILE and --output FILE (rank 0 writes the file)")
    settings = given_or_default(args, SCORE_FIELDS)
    model, tokenizer = load_for_command(args, settings)
    inputs = read_score_inputs(args.input)
    rewards = score_texts(model, tokenizer, inputs, settings["max_length"], settings["batch_size"], settings["packing"])
    for reward in rewards:
        print(f"{reward:.6f}")
    if not all(math.isfinite(reward) for reward in rewards):
        raise SystemExit("lora-rm: error: some rewards are NaN or inf: the adapter's rewards are not finite, e.g. "
                         "saved from a diverged run")


def run_score_file(args: argparse.Namespace) -> None:
    """score --output: streamed, resumable, split over torchrun's processes (scoring.score_file)."""
    import torch

    from . import distributed
    from .model_io import default_device
    from .scoring import score_file

    settings = given_or_default(args, SCORE_FIELDS)
    if not args.input or args.input == "-":
        raise ValueError("score --output needs --input FILE: a resumed run reads its input again from the start")
    if args.window < 1:
        usage_error(f"--window must be at least 1, got {args.window}")
    if not Path(args.input).is_file():  # both checked before the model loads
        raise ValueError(f"--input {args.input}: no such file")
    if not Path(args.output).resolve().parent.is_dir():
        raise ValueError(f"--output {args.output}: its folder does not exist")
    with distributed.process_group():
        device = torch.device(default_device(settings["device"]))
        _, _, device = distributed.init_from_env(device)  # under torchrun: one GPU per process
        model, tokenizer = load_for_command(args, {**settings, "device": str(device)})
        done = score_file(model, tokenizer, args.input, args.output, settings["max_length"], settings["batch_size"],
                          settings["packing"], args.window, settings["progress"])
        distributed.print_main(f"scored {done['rows']} rows into {args.output} ({done['resumed']} already there)",
                               file=sys.stderr)
    if done["nonfinite"]:
        raise SystemExit(f"lora-rm: error: {done['nonfinite']} rewards are NaN or inf (written as null): the model's "
                         "rewards are not finite, e.g. saved from a diverged run")


def run_merge(args: argparse.Namespace) -> None:
    from .inject import merge_lora
    from .model_card import write_merged_card
    from .model_io import check_merge_output, save_merged, torch_dtype
    from .qlora import dequantize_4bit_layers

    settings = given_or_default(args, LOAD_FIELDS)
    check_merge_output(Path(args.output), Path(args.adapter))  # before the model loads
    model, tokenizer = load_for_command(args, settings)
    if settings["load_in_4bit"]:  # merge into dequantized fp32 weights, then store in base_dtype
        dequantize_4bit_layers(model, torch_dtype("fp32"))
    merged = merge_lora(model).to(torch_dtype(settings["base_dtype"]))
    save_merged(merged, tokenizer, Path(args.output))  # plain tokenizer(text) then appends the EOS training appended
    write_merged_card(Path(args.output), Path(args.adapter), settings["model"])
    print(f"merged model written to {args.output}")


def run_push(args: argparse.Namespace) -> None:
    from .model_card import push

    url = push(Path(args.folder), args.repo, args.private)
    print(f"pushed {args.folder} to {url}")


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    """ServeConfig from the flags given; the API key from --api-key, else $LORA_RM_API_KEY (unset or empty: none)."""
    names = [f.name for f in dataclasses.fields(ServeConfig)]
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    given["api_key"] = given.get("api_key") or os.environ.get("LORA_RM_API_KEY") or None
    return ServeConfig(**given)


def run_serve(args: argparse.Namespace) -> None:
    from . import serve

    serve.require_web_stack()  # before the model loads: a missing extra fails in a second
    config = serve_config_from_args(args)
    normalization = serve.read_reward_stats(args.adapter) if config.normalize else None
    settings = given_or_default(args, SERVE_FIELDS)
    model, tokenizer = load_for_command(args, settings)
    serve.serve(model, tokenizer, config, settings["max_length"], settings["packing"], normalization)


def add_serve_parser(commands: Any, defaults: TrainConfig, debug_help: str) -> None:
    """`lora-rm serve`: score's loading flags, --adapter optional (a stock one-label model serves as it is)."""
    sub = commands.add_parser("serve", help="serve rewards over HTTP (needs lora-rm[serve])",
                              argument_default=argparse.SUPPRESS)
    sub.add_argument("--adapter", default=None, help="folder with adapter_config.json (ours or PEFT's); default: "
                     "none, the --model as it is (a one-label *ForSequenceClassification, e.g. a merged one)")
    add_field_flags(sub, TrainConfig, SERVE_FIELDS, defaults)
    add_field_flags(sub, ServeConfig, [f.name for f in dataclasses.fields(ServeConfig)], ServeConfig())
    sub.add_argument("--debug", action="store_true", help=debug_help)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lora-rm", description="LoRA reward models in plain PyTorch",
                           argument_default=argparse.SUPPRESS)
    debug_help = "show the traceback of an error (or set LORA_RM_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", default=False, help=debug_help)
    commands = parser.add_subparsers(dest="command")
    defaults = TrainConfig()
    train = commands.add_parser("train", help="train a reward model (no flags: the built-in demo, ~10 s when idle)",
                                argument_default=argparse.SUPPRESS)
    train_fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "lora"]
    add_field_flags(train, TrainConfig, train_fields, defaults, BUILTIN_TRAIN_DEFAULTS)
    add_field_flags(train, LoraConfig, LORA_FIELDS, defaults.lora)
    train.add_argument("--debug", action="store_true", help=debug_help)
    for name, help_text, fields in [
        ("eval", "accuracy and margins on preference pairs", EVAL_FIELDS),
        ("score", "one reward per text", SCORE_FIELDS),
        ("merge", "fold the adapter into a plain HF model", LOAD_FIELDS),
    ]:
        sub = commands.add_parser(name, help=help_text, argument_default=argparse.SUPPRESS)
        if name == "merge":
            sub.add_argument("--adapter", required=True, help="folder with adapter_config.json (ours or PEFT's)")
        else:
            sub.add_argument("--adapter", default=None, help="folder with adapter_config.json (ours or PEFT's); "
                             "without it --model is used as it is: any one-label AutoModelForSequenceClassification")
        add_field_flags(sub, TrainConfig, fields, defaults, help_texts=COMMAND_HELP.get(name))
        sub.add_argument("--debug", action="store_true", help=debug_help)
        if name == "eval":
            sub.add_argument("--seed", type=int, default=1, help="seed of the built-in task (default 1: unseen pairs)")
            sub.add_argument("--report", default=None, help="folder for the reward report (PNGs; needs lora-rm[plot])")
            sub.add_argument("--log", default=None, help="a training log.jsonl to plot loss and accuracy curves from")
            sub.add_argument("--sections", default=None, help="JSON {section: [subsets]}: section scores weighted "
                             "by pairs, as RewardBench (needs a 'subset' column)")
            sub.add_argument("--predictions", default=None, help="JSONL file: one line per scored pair, {id, "
                             "chosen_reward, rejected_reward}; id is the row's 'id', else its 0-based row index")
            sub.add_argument("--benchmark", default=None, choices=BENCHMARKS, help="RewardBench's official scores "
                             "(sections, overall) on DATA in allenai/reward-bench's or reward-bench-2's schema")
            sub.add_argument("data", nargs="?", default=None, metavar="DATA", help="the data (same as --dataset)")
        if name == "score":
            sub.add_argument("--input", default=None, help="JSONL ('text', 'messages', or 'prompt' and 'response'; "
                             "optional 'id') or plain lines; default stdin")
            sub.add_argument("--output", default=None, help="JSONL file of {id, reward} lines in input order, "
                             "streamed and resumable (rerun the same command after a kill); id is the row's 'id', "
                             "else its 1-based line number in --input. Without it: one reward per line on stdout")
            sub.add_argument("--window", type=int, default=1024, help="with --output: rows read, sorted by length "
                             "and scored together; memory holds one window; a resumed run needs the same value "
                             "(default: 1024)")
        if name == "merge":
            sub.add_argument("--output", required=True, help="folder for the merged model and its tokenizer")
    push = commands.add_parser("push", help="upload a trained or merged folder to the Hugging Face hub")
    push.add_argument("folder", help="a folder `lora-rm train` or `lora-rm merge` wrote")
    push.add_argument("--repo", required=True, help="hub repo id, e.g. you/my-reward-model (created if missing)")
    push.add_argument("--private", action="store_true", default=False, help="create the repo private")
    push.add_argument("--debug", action="store_true", help=debug_help)
    add_serve_parser(commands, defaults, debug_help)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse, check the settings (usage errors exit 2), run; any failure is one line (exit 1) unless --debug."""
    parser = build_parser()
    args = parser.parse_args(join_negative_values(sys.argv[1:] if argv is None else argv))
    command = getattr(args, "command", None)
    if command is None:
        parser.print_help()
        return
    check_settings(args)
    run = {"train": run_train, "eval": run_eval, "score": run_score, "merge": run_merge, "push": run_push,
           "serve": run_serve}[command]
    if args.debug or os.environ.get("LORA_RM_DEBUG", "0") not in ("", "0"):
        run(args)
        return
    try:
        run(args)
    except Exception as error:  # KeyboardInterrupt and SystemExit pass through as they are
        raise SystemExit(one_line_error(failure_message(error))) from None


def failure_message(error: Exception) -> str:
    """The error's own words; the type too where the words alone do not say what went wrong (KeyError: 'x')."""
    expected = (ValueError, TypeError, OSError, RuntimeError)  # ours and the loaders' errors carry their own message
    if isinstance(error, expected) and str(error):
        return str(error)
    return f"{type(error).__name__}: {error} (run with --debug or LORA_RM_DEBUG=1 for the traceback)"


def entry_point(argv: list[str] | None = None) -> None:
    """The `lora-rm` command: main(), with Ctrl-C said in one line and exit code 130 (main itself lets it through,
    so that code calling main can catch it)."""
    try:
        main(argv)
    except KeyboardInterrupt:
        print("lora-rm: interrupted (Ctrl-C); a training run continues from its last checkpoint with --resume",
              file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    entry_point()
