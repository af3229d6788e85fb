"""Preference data: load, detect the format, tokenize each side exactly as TRL 1.16 does, order and collate.

Formats, named as TRL names them:
  implicit        chosen, rejected: full texts with the prompt inside both (HH-RLHF)
  explicit        prompt, chosen, rejected: texts; each side is prompt + completion
  conversational  the same columns holding lists of {"role", "content"} messages, rendered by the chat
                  template
  tokenized       chosen_ids, rejected_ids (TRL 1.x) or input_ids_chosen, input_ids_rejected (TRL 0.x)
An optional numeric `margin` column is carried into the batch. Rankings of K answers (`responses` + `scores`, or
`chosen`/`rejected` as lists) are tokenized by ranking.py, which tokenize_pairs hands them to.

Local files are read by data_files.py, each cell as written. Every row keeps where it came from (file and
1-based line, or hub split and row index) in the column ROW_SOURCE, through any row selection, for errors.

Where the reward is read: Hugging Face's *ForSequenceClassification heads score the rightmost token whose id
is not pad_token_id. When pad == EOS, the EOS that ends each text is skipped and the score is read at the
token just before it, in a padded batch and alone alike; TRL trains the same way. We keep the model's own
reading, so a merged model served by plain transformers scores exactly what was trained.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, ReadInstruction, load_dataset
from transformers import PreTrainedTokenizerBase

from . import distributed, ranking
from .builtin import BUILTIN_PAIRS, builtin_preference_dataset
from .config import BUILTIN, LENGTH_POLICIES, TrainConfig
from .data_files import ROW_PROBLEM, ROW_SOURCE, find_preference_files, read_preference_files
from .encode import (
    UNK_CHECK_PAIRS,
    DataStats,
    check_unknown_share,
    encode_text,
    is_messages,
    pad_sequences,
    side_problem,
)
from .run_folder import TRAIN_CONFIG_NAME, read_saved_config

MIN_EVAL_PAIRS = 20  # an automatic eval split smaller than this gets a warning: its accuracy moves in steps of 5%+
TOKENIZED_COLUMNS = (("chosen_ids", "rejected_ids"), ("input_ids_chosen", "input_ids_rejected"))
PAIR_ID = "_pair_id"  # eval --predictions: each pair's id as JSON text (evaluate.with_pair_ids), kept by tokenize_pairs


def _select_rows(dataset: Dataset, rows: str) -> Dataset:
    """Apply a Python slice written as text, "start:stop", e.g. "-512:" for the last 512 rows."""
    start, colon, stop = rows.partition(":")
    try:
        if not colon:
            raise ValueError
        bounds = slice(int(start) if start.strip() else None, int(stop) if stop.strip() else None)
    except ValueError:
        raise ValueError(f"rows={rows!r} is not a slice like '-512:', ':1000' or '100:200'") from None
    return dataset.select(range(len(dataset))[bounds])


def load_preference_dataset(
    source: str, split: str | None = "train", max_rows: int | None = None, rows: str | None = None, seed: int = 0,
    skip_bad_rows: bool = False,
) -> Dataset:
    """Load a local .json/.jsonl(.gz)/.parquet/.csv file or folder of them, a hub id with `split`, or "builtin".

    `split` is datasets' split spec, slices included ('train[:20]', 'train[10%:]'); local files and the built-in
    task form one split, 'train' (None: all of it; a hub id: 'train'). `rows` is a Python slice as text applied
    next ("-512:" keeps the last 512 rows, "100:200" a window), then `max_rows` keeps the first N of what is left.
    `seed` draws the built-in task's questions (lora_rm/builtin.py). `skip_bad_rows` keeps a JSON line that does not
    parse as a row for tokenize_pairs to skip and count (data_files.ROW_PROBLEM); without it loading stops there.
    """
    dataset = _builtin_or_file_or_hub(source, split, seed, skip_bad_rows)
    if rows is not None:
        dataset = _select_rows(dataset, rows)
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    return dataset


def _builtin_or_file_or_hub(source: str, split: str, seed: int, skip_bad_rows: bool) -> Dataset:
    """The whole dataset `source` names, before any row selection."""
    if source == BUILTIN:
        dataset = builtin_preference_dataset(BUILTIN_PAIRS, seed=seed)
        dataset = dataset.add_column(ROW_SOURCE, [f"builtin row index {i}" for i in range(len(dataset))])
        return _local_split(dataset, split, source)
    files = find_preference_files(source)
    if files:
        return _local_split(read_preference_files(source, files, skip_bad_rows), split, source)
    split = split or "train"
    try:
        dataset = load_dataset(source, split=split)
    except Exception as err:
        message = f"{source!r} is not a local file or folder and did not load from the hub: {err}"
        raise ValueError(message) from err
    return dataset.add_column(ROW_SOURCE, [f"{source} split {split!r} row index {i}" for i in range(len(dataset))])


def _local_split(dataset: Dataset, split: str | None, source: str) -> Dataset:
    """The rows of a local file's (or the built-in task's) one split, 'train', that `split` selects, as datasets reads
    a split spec: 'train', 'train[:20]', 'train[10%:]'; None: all of them."""
    if split is None:
        return dataset
    try:
        instructions = ReadInstruction.from_spec(split).to_absolute({"train": len(dataset)})
    except (ValueError, AssertionError) as error:
        raise ValueError(f"--split {split!r} does not select rows of {source} ({error}): local data and the built-in "
                         "task form one split, 'train', sliced as 'train[:20]' or 'train[10%:]'") from None
    return dataset.select([i for part in instructions for i in range(part.from_, part.to)])


def hub_or_local_split(source: str, split: str | None, hub_default: str) -> str | None:
    """`split`, or when it is unset `hub_default` for a hub id and None (all rows) for local data."""
    if split is not None or source == BUILTIN:
        return split
    try:
        return None if find_preference_files(source) else hub_default
    except FileNotFoundError:  # a local path that is not there: loading it names the problem
        return None


def check_subsets(dataset: Dataset) -> None:
    """With a subset column every row needs one (per-subset evaluation, eval_stats.py): the first row without one
    is named before anything is scored. Lines skipped as bad rows (ROW_PROBLEM) are not counted here."""
    if "subset" not in dataset.column_names:
        return
    where = dataset[ROW_SOURCE] if ROW_SOURCE in dataset.column_names else [f"row {i}" for i in range(len(dataset))]
    problems = dataset[ROW_PROBLEM] if ROW_PROBLEM in dataset.column_names else [None] * len(dataset)
    missing = [row for row, subset, problem in zip(where, dataset["subset"], problems, strict=True)
               if (subset is None or subset == "") and not problem]
    if missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{missing[0]}: no subset ({len(missing)} rows lack one: {listed}); every row needs one when "
                         "the data has a subset column")


def detect_format(dataset: Dataset) -> str:
    """'tokenized', 'conversational', 'explicit' or 'implicit', from columns and first row, as TRL does.

    The first row whose chosen is text or a list decides, so that one bad first row does not fail all the others.
    """
    columns = set(dataset.column_names)
    if any(chosen in columns and rejected in columns for chosen, rejected in TOKENIZED_COLUMNS):
        return "tokenized"
    missing = [name for name in ("chosen", "rejected") if name not in columns]
    if missing:
        raise ValueError(f"preference data needs columns {missing}; it has {sorted(columns)}")
    first = next((value for value in dataset["chosen"] if isinstance(value, (str, list))), None)
    if is_messages(first):
        return "conversational"
    return "explicit" if "prompt" in columns else "implicit"


def _row_problem(row: dict[str, Any], data_format: str, ids_columns: tuple[str, str],
                 vocab_size: int | None = None) -> str | None:
    """Why a row cannot be a training pair, or None; vocab_size bounds pre-tokenized ids (the model's embeddings)."""
    if row.get(ROW_PROBLEM):  # a line that did not read as a row (data_files, with skip_bad_rows)
        return row[ROW_PROBLEM]
    if "margin" in row and not (isinstance(row["margin"], (int, float)) and math.isfinite(row["margin"])):
        return f"margin is not a finite number: {row['margin']!r}"
    if data_format == "tokenized":
        for name in ids_columns:
            ids = row[name]
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
                return f"{name} is not a non-empty list of token ids"
            outside = next((t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)), None)
            if outside is not None:
                return (f"{name} holds token id {outside}, outside the model's vocabulary of {vocab_size} ids"
                        if outside >= 0 else f"{name} holds the negative token id {outside}")
        return "chosen is identical to rejected" if row[ids_columns[0]] == row[ids_columns[1]] else None
    names = ("prompt", "chosen", "rejected") if "prompt" in row else ("chosen", "rejected")
    for name in names:
        problem = side_problem(name, row[name], data_format == "conversational")
        if problem:
            return problem
    return "chosen is identical to rejected" if row["chosen"] == row["rejected"] else None


def _encode_row(
    row: dict[str, Any],
    index: int,
    tokenizer: PreTrainedTokenizerBase,
    data_format: str,
    max_length: int | None,
    length_policy: str,
    skip_bad_rows: bool,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """One row to chosen_ids, rejected_ids, length and status (ok, bad, too_long, truncated)."""
    ids_columns = next((c for c in TOKENIZED_COLUMNS if c[0] in row and c[1] in row), ("chosen", "rejected"))
    problem = _row_problem(row, data_format, ids_columns, vocab_size)
    if problem is None and data_format == "tokenized":
        chosen_ids, rejected_ids = row[ids_columns[0]], row[ids_columns[1]]
    elif problem is None:
        chosen_ids = encode_text(tokenizer, row.get("prompt"), row["chosen"])
        rejected_ids = encode_text(tokenizer, row.get("prompt"), row["rejected"])
        if chosen_ids == rejected_ids:
            problem = "chosen and rejected tokenize to the same ids"
    if problem is not None:
        where = row.get(ROW_SOURCE) or f"row {index}"
        if not skip_bad_rows:
            raise ValueError(f"{where}: {problem} (pass --skip-bad-rows to skip such rows)")
        return {"chosen_ids": [], "rejected_ids": [], "length": 0, "status": "bad", "skipped": f"{where} ({problem})"}
    status = "ok"
    if max_length is not None and max(len(chosen_ids), len(rejected_ids)) > max_length:
        if length_policy == "drop":
            status = "too_long"
        else:  # keep the end of each side, where the response and its EOS are and where the reward is read
            status = "truncated"
            chosen_ids, rejected_ids = chosen_ids[-max_length:], rejected_ids[-max_length:]
    length = max(len(chosen_ids), len(rejected_ids))
    return {
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "length": length,
        "status": status,
        "skipped": "",
    }


def tokenize_pairs(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase | None,
    max_length: int | None = None,
    length_policy: str = "drop",
    skip_bad_rows: bool = False,
    vocab_size: int | None = None,
) -> tuple[Dataset, DataStats]:
    """Tokenize every pair to columns chosen_ids, rejected_ids, length (the longer side) and margin if any.

    Args:
        length_policy: "drop" removes pairs with a side over max_length tokens (TRL's rule);
            "truncate_left" keeps the last max_length tokens of each side (the prompt start, BOS included,
            is lost).
        skip_bad_rows: False raises ValueError naming the first bad row; True skips and counts them.
        tokenizer: may be None for pre-tokenized data.
        vocab_size: the model's input embeddings; a pre-tokenized id at or over it is a bad row (not an IndexError
            mid-run).
    """
    if length_policy not in LENGTH_POLICIES:
        raise ValueError(f"length_policy must be one of {LENGTH_POLICIES}, got {length_policy!r}")
    if max_length is not None and max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if len(dataset) == 0:
        raise ValueError("the preference dataset has no rows")
    if ranking.ranking_shape(dataset) is not None:
        return ranking.tokenize_rankings(dataset, tokenizer, max_length, length_policy, skip_bad_rows)
    data_format = detect_format(dataset)
    if data_format != "tokenized":  # first, so that all-unknown sides are not reported as identical pairs
        _check_known_tokens(dataset.select(range(min(UNK_CHECK_PAIRS, len(dataset)))), tokenizer, data_format)
    kwargs = {
        "tokenizer": tokenizer,
        "data_format": data_format,
        "max_length": max_length,
        "length_policy": length_policy,
        "skip_bad_rows": skip_bad_rows,
        "vocab_size": vocab_size,
    }
    keep_columns = {"margin", "subset", PAIR_ID}  # subset: per-subset evaluation (eval_stats.py)
    encoded = dataset.map(
        _encode_row,
        fn_kwargs=kwargs,
        with_indices=True,
        remove_columns=[c for c in dataset.column_names if c not in keep_columns],
        keep_in_memory=True,  # datasets hashes _encode_row by name: a disk cache would outlive code changes
        desc="Tokenizing preference pairs",
    )
    statuses = encoded["status"]
    counts = Counter(statuses)
    kept = [i for i, status in enumerate(statuses) if status in ("ok", "truncated")]
    stats = DataStats(
        n_rows=len(dataset),
        n_kept=len(kept),
        n_dropped_too_long=counts["too_long"],
        n_truncated=counts["truncated"],
        n_bad_skipped=counts["bad"],
    )
    if counts["truncated"]:
        check_truncated_sides(encoded, statuses, len(kept), max_length)
    if counts["bad"]:  # only then read the column: a list the size of the data otherwise
        skipped = [where for where in encoded["skipped"] if where]
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        distributed.print_main(f"skipped {len(skipped)} bad rows: {', '.join(skipped[:5])}{more}")
    return encoded.select(kept).remove_columns(["status", "skipped"]), stats


def check_truncated_sides(encoded: Dataset, statuses: list[str], n_kept: int, max_length: int) -> None:
    """Fail when truncation left every kept pair with identical sides (each a tie: nothing to learn or rank), warn
    when it left some."""
    truncated = [i for i, status in enumerate(statuses) if status == "truncated"]
    sides = encoded.select(truncated)
    identical = sum(c == r for c, r in zip(sides["chosen_ids"], sides["rejected_ids"], strict=True))
    advice = (f"--length-policy truncate_left kept the last {max_length} tokens of each side, and the sides differ "
              "only before them; raise --max-length, or use --length-policy drop")
    if identical == n_kept:
        raise ValueError(f"every one of the {n_kept} kept pairs has identical chosen and rejected ids after {advice}")
    if identical:
        distributed.print_main(f"warning: {identical} of the {len(truncated)} truncated pairs have identical chosen "
                               f"and rejected ids (each scores a tie): {advice}")


def _check_known_tokens(rows: Dataset, tokenizer: PreTrainedTokenizerBase, data_format: str) -> None:
    """Stop when most tokens are the unknown token: the model would learn from nothing (HH text, --model builtin)."""
    ids = [
        token
        for row in rows
        if _row_problem(row, data_format, ("chosen", "rejected")) is None
        for side in ("chosen", "rejected")
        for token in encode_text(tokenizer, row.get("prompt"), row[side])
    ]
    check_unknown_share(ids, len(rows), tokenizer)


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """A collated batch on `device`; on CUDA copied from pinned memory without blocking, since a copy from pageable
    memory waits until the GPU has finished everything queued before it."""
    if torch.device(device).type != "cuda":
        return {key: tensor.to(device) for key, tensor in batch.items()}
    return {key: tensor.pin_memory().to(device, non_blocking=True) for key, tensor in batch.items()}


def collate_pairs(pairs: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad chosen then rejected into one batch: rows 0..B-1 chosen, B..2B-1 rejected, as TRL's collator.

    Always right padding, as TRL. Left padding scores exactly only where positions are relative (RoPE: Llama,
    Qwen) or read from the mask (OPT); GPT-2 in transformers 5.24 shifts its absolute positions and so changes
    the reward.
    """
    sequences = [pair["chosen_ids"] for pair in pairs] + [pair["rejected_ids"] for pair in pairs]
    input_ids, attention_mask = pad_sequences(sequences, pad_token_id, "right")  # (2B, L) each
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "margin" in pairs[0]:
        batch["margin"] = torch.tensor([float(pair["margin"]) for pair in pairs], dtype=torch.float32)  # (B,)
    return batch


def batch_indices(
    lengths: list[int],
    batch_size: int,
    seed: int,
    epoch: int,
    group_by_length: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> list[list[int]]:
    """This rank's batches of pair indices for one epoch, a pure function of (seed, epoch) for exact resume.

    A global batch holds batch_size * world_size pairs and rank r takes its r-th contiguous piece, so 2 ranks
    of 4 pairs see the same global batches as 1 rank of 8. group_by_length sorts pairs by length within chunks
    of 50 global batches, then shuffles the batches, to cut padding. A short last global batch is split evenly
    over the ranks, or dropped if it has fewer pairs than ranks (all ranks step together).
    """
    if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size > 0 and 0 <= rank < world_size, got {batch_size=} {rank=} {world_size=}"
        )
    lengths = list(lengths)  # a datasets Column indexes slowly
    generator = torch.Generator().manual_seed(seed + epoch)
    n = len(lengths)
    order = torch.randperm(n, generator=generator).tolist()
    global_size = batch_size * world_size
    if group_by_length:
        chunk = 50 * global_size
        order = [
            i
            for start in range(0, len(order), chunk)
            for i in sorted(order[start : start + chunk], key=lambda i: -lengths[i])
        ]
    batches = [order[start : start + global_size] for start in range(0, len(order), global_size)]
    if batches and len(batches[-1]) < world_size:
        batches.pop()
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return [
        batch[rank * len(batch) // world_size : (rank + 1) * len(batch) // world_size] for batch in batches
    ]


def check_step_fits(n_pairs: int, n_batches: int, config: TrainConfig, world_size: int) -> None:
    """Refuse an optimizer step that takes more micro-batches than an epoch holds: it would pass over the data
    several times within one step and log that as one epoch. Refused, not capped: a smaller batch would change the
    step the flags asked for."""
    if n_batches < config.grad_accum:
        raise ValueError(
            f"one optimizer step takes {config.batch_size * config.grad_accum * world_size} pairs (batch_size "
            f"{config.batch_size} x grad_accum {config.grad_accum} x {world_size} processes) but the training data "
            f"holds {n_pairs} pairs ({n_batches} micro-batches per process): lower --batch-size or --grad-accum"
        )


def collate_rows(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """ranking.collate_groups for K-way rows, collate_pairs for pairs: one collator for either kind of data."""
    if ranking.is_ranking_rows(rows):
        return ranking.collate_groups(rows, pad_token_id)
    return collate_pairs(rows, pad_token_id)


def load_pairs(config: TrainConfig, tokenizer, vocab_size: int | None = None
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Tokenized (train, eval) pairs; without an eval dataset, the last eval_fraction of the training rows.

    vocab_size: the model's, which pre-tokenized ids must stay under."""
    train_data = load_preference_dataset(config.dataset, config.split, config.max_rows, config.rows, config.seed,
                                         config.skip_bad_rows)
    if config.eval_dataset is not None:  # several: the first here, the others in named_eval_sets
        source = eval_sources(config)[0]
        eval_data = load_preference_dataset(source, hub_or_local_split(source, config.eval_split, "test"),
                                            config.max_eval_rows, config.eval_rows, skip_bad_rows=config.skip_bad_rows)
    else:
        n_rows = len(train_data)
        train_data, eval_data = split_off_eval(train_data, config.eval_fraction)
    train_pairs = tokenize(train_data, tokenizer, config, "train", vocab_size)
    eval_pairs = tokenize(eval_data, tokenizer, config, "eval", vocab_size)
    if config.eval_dataset is None and len(eval_pairs) < MIN_EVAL_PAIRS:
        distributed.print_main(
            f"warning: the automatic eval split holds only {len(eval_pairs)} pairs (eval_fraction="
            f"{config.eval_fraction} of {n_rows} rows): its accuracy is noise; raise --eval-fraction or pass "
            "--eval-dataset"
        )
    return train_pairs, eval_pairs


def split_off_eval(rows: Dataset, eval_fraction: float) -> tuple[Dataset, Dataset]:
    """(train, eval): the last eval_fraction of the rows held out, less every row that is also a training row
    (a duplicate pair would be scored on what was trained: the built-in task repeats many)."""
    n_train = len(rows) - max(1, int(len(rows) * eval_fraction))
    train_rows, held_out = rows.select(range(n_train)), rows.select(range(n_train, len(rows)))
    eval_rows, n_seen = without_rows_of(held_out, train_rows)
    if n_seen:
        distributed.print_main(f"eval split: {n_seen} of its {len(held_out)} rows are also training rows; left out",
                               file=sys.stderr)
    if not len(eval_rows):
        raise ValueError(f"every one of the {len(held_out)} held-out rows (eval_fraction {eval_fraction}) is also a "
                         "training row: nothing unseen to evaluate; pass --eval-dataset or raise --eval-fraction")
    return train_rows, eval_rows


def row_key(row: dict[str, Any]) -> str:
    """A row's content (every column but where it was read), to find the same pair among other rows."""
    return json.dumps({name: value for name, value in row.items() if name != ROW_SOURCE}, sort_keys=True, default=str)


def without_rows_of(dataset: Dataset, other: Dataset) -> tuple[Dataset, int]:
    """The rows of `dataset` that are not rows of `other`, and how many were left out."""
    seen = {row_key(row) for row in other}
    kept = [index for index, row in enumerate(dataset) if row_key(row) not in seen]
    return dataset.select(kept), len(dataset) - len(kept)


def without_training_rows(dataset: Dataset, source: str, adapter: str | Path | None) -> Dataset:
    """The built-in task's eval rows less those the adapter trained on (its run's train_config.json): eval's
    'unseen' draw (--seed 1) repeats most of the pairs a built-in run trains on. Other data is evaluated as named:
    evaluating on training rows may be the point there."""
    if source != BUILTIN or adapter is None:
        return dataset
    run = Path(adapter).parent.parent if Path(adapter).parent.name == "checkpoints" else Path(adapter)  # step-N
    saved = read_saved_config(run) or {}
    saved_path = run / TRAIN_CONFIG_NAME
    if saved.get("dataset") != source:
        return dataset
    trained = load_preference_dataset(source, saved.get("split", "train"), saved.get("max_rows"), saved.get("rows"),
                                      saved.get("seed", 0), saved.get("skip_bad_rows", False))
    if saved.get("eval_dataset") is None:
        trained = split_off_eval(trained, saved.get("eval_fraction", 0.1))[0]
    kept, n_seen = without_rows_of(dataset, trained)
    if n_seen:
        print(f"eval: {n_seen} of the {len(dataset)} rows are rows the adapter trained on ({saved_path}); left out",
              file=sys.stderr)
    if not len(kept):
        raise ValueError(f"every eval row is a row the adapter trained on ({saved_path}): nothing unseen to evaluate")
    return kept


def eval_sources(config: TrainConfig) -> list[str]:
    """The --eval-dataset values as a list (one or several; none: empty)."""
    if config.eval_dataset is None:
        return []
    return [config.eval_dataset] if isinstance(config.eval_dataset, str) else list(config.eval_dataset)


def eval_set_name(source: str) -> str:
    """A short name of an eval dataset for log keys: the file name without its suffixes, or a hub id's last part."""
    name = Path(source).name
    for suffix in (".gz", ".jsonl", ".json", ".parquet", ".csv"):
        name = name.removesuffix(suffix)
    return name or source


def named_eval_sets(config: TrainConfig, tokenizer, first: list[dict[str, Any]], vocab_size: int | None = None
                    ) -> dict[str, list[dict[str, Any]]]:
    """Log-key prefix -> eval pairs: "eval" for one eval set (the keys as ever), "eval_<name>" for each of several.

    "eval_<name>_accuracy" is the key transformers' Trainer logs for a dict of eval datasets. Every eval set takes
    eval_split, eval_rows and max_eval_rows.
    """
    sources = eval_sources(config)
    if len(sources) < 2:
        return {"eval": first}
    names = [eval_set_name(source) for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--eval-dataset: several datasets are named {repeated} (file name or hub id's last part); "
                         "rename the files so that each is logged under its own name")
    sets = {f"eval_{names[0]}": first}
    for source, name in zip(sources[1:], names[1:], strict=True):
        split = hub_or_local_split(source, config.eval_split, "test")
        rows = load_preference_dataset(source, split, config.max_eval_rows, config.eval_rows,
                                       skip_bad_rows=config.skip_bad_rows)
        sets[f"eval_{name}"] = tokenize(rows, tokenizer, config, f"eval {name}", vocab_size)
    return sets


def tokenize(dataset, tokenizer, config: TrainConfig, name: str, vocab_size: int | None = None
             ) -> list[dict[str, Any]]:
    """Tokenized pairs as plain dicts, with what the length policy and bad-row skipping did printed."""
    pairs, stats = tokenize_pairs(
        dataset, tokenizer, config.max_length, config.length_policy, config.skip_bad_rows, vocab_size
    )
    distributed.print_main(f"{name} pairs: {stats}")
    if not len(pairs):
        raise ValueError(no_pairs_left(name, stats, config.max_length))
    return pairs.to_list()


def no_pairs_left(name: str, stats: DataStats, max_length: int | None) -> str:
    """Why no pair of a set survived tokenization, and what to change."""
    return (f"no {name} pairs left: all {stats.n_rows} rows were dropped ({stats.n_dropped_too_long} longer than "
            f"--max-length {max_length}, {stats.n_bad_skipped} bad rows skipped); raise --max-length, pass "
            "--length-policy truncate_left, or check the data")
