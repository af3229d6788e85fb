"""A run's output folder: one run at a time (OUTPUT/.lock), no mixing of runs, a resume with the settings that ran,
and log.jsonl.

    OUTPUT/
        .lock                 {"pid", "host", "started"} of the run writing here; removed when it ends
        train_config.json     the settings that ran (written after a resume's settings are checked)
        log.jsonl             one JSON record per log line and per evaluation
        checkpoints/          checkpoint.py's step-N folders
        adapter_model.safetensors, adapter_config.json, tokenizer files, eval_metrics.json, reward_stats.json
        events.out.tfevents.*  with --report-to tensorboard
        report/               `lora-rm eval --report OUTPUT/report`, the command a run prints at its end (plots.py)

--overwrite deletes only these (RUN_ENTRIES): a folder holding anything else is refused, naming what is there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fnmatch
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import distributed
from .atomic import atomic_path, write_json
from .config import TrainConfig
from .eval_stats import finite_or_none

LOCK_NAME = ".lock"  # in the output folder while a run writes there: {"pid", "host", "started"}
TRAIN_CONFIG_NAME = "train_config.json"
# What a run (or its report) writes into its output folder, as fnmatch patterns: all --overwrite may delete.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
RUN_ENTRIES = {
    "": (LOCK_NAME, TRAIN_CONFIG_NAME, "log.jsonl", "checkpoints", "adapter_model.safetensors",
         "adapter_config.json", "eval_metrics.json", "reward_stats.json", "events.out.tfevents.*", "report",
         "additional_chat_templates", "README.md", "init_adapter.json", *TOKENIZER_FILES),  # README.md: the card
    "checkpoints": ("step-[0-9]*", ".tmp-step-[0-9]*", "diverged-step-[0-9]*"),
    "report": ("metrics.json", "*.png"),
    "additional_chat_templates": ("*.jinja",),
}
ATOMIC_LEFTOVER = re.compile(r"\.(.+)\.\w{8}")  # atomic.py's temporary name `.NAME.XXXXXXXX`, left by a kill

# How a process was started, not what it trains: left out of train_config.json, and ignored where an older run saved
# it (a saved overwrite=true would otherwise make every later --resume "resume and overwrite exclude each other").
NOT_SAVED = ("overwrite",)
# What a resume may change, each on purpose; any other changed setting is refused (it would not be what ran).
RESUME_MAY_CHANGE = {
    "max_steps": "extends (or shortens) the run; the schedule follows the new total from here on",
    "epochs": "the same, counted in passes over the data",
    "resume": "how this process was started, not what it trains",
    "overwrite": "the same (a resume never overwrites)",
    "output": "the same run, reached by another path or copied to another folder",
    "progress": "display only",
    "report_to": "where the log is copied to, not what is trained",
    "log_every": "how often the loss is logged, not what is trained",
    "eval_every": "when to evaluate, not what is trained",
    "save_every": "when to checkpoint, not what is trained",
    "keep_checkpoints": "disk use only",
    "device": "where it runs (another node or GPU); the math is the same",
    "batch_size": "the per-process share, to resume under another number of processes; checkpoint."
                  "resume_from_latest_checkpoint refuses a changed global batch (batch_size x processes x grad_accum)",
    "grad_accum": "the same; not under group_by_length, whose length groups follow the micro-batch (refused there)",
    "gradient_checkpointing": "trades memory for compute; the gradients are the same",
    "reentrant_checkpointing": "the same",
    "allow_pickle_weights": "how the base's weights may be read, not which weights",
}


def lock_holder(lock: Path) -> dict[str, Any] | None:
    """The {pid, host, started} a run wrote into its lock; None when the file is unreadable."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) and {"pid", "host", "started"} <= set(holder) else None


def holder_is_gone(holder: dict[str, Any]) -> bool:
    """True only when the holder ran on this host and its pid is no live process (or is this very process)."""
    if holder["host"] != socket.gethostname():
        return False  # another node's process cannot be asked
    if holder["pid"] == os.getpid():
        return True  # a container restarted after a kill -9 gets the same pid; this process holds no lock yet
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False  # PermissionError: alive, another user's
    return False


def take_output_lock(output: Path) -> Path:
    """Create OUTPUT/.lock for this process (O_EXCL: exactly one run wins); a dead holder's lock is taken over."""
    output.mkdir(parents=True, exist_ok=True)
    lock = output / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    for attempt in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = lock_holder(lock)
            if attempt == 0 and holder is not None and holder_is_gone(holder):
                print(f"taking over the stale lock {lock}: pid {holder['pid']} on {holder['host']} (started "
                      f"{holder['started']}) is no longer running")
                lock.unlink(missing_ok=True)
                continue
            if holder is None:
                raise FileExistsError(
                    f"{output} is locked by {lock}, which is unreadable; if no run writes to this folder, delete it"
                ) from None
            raise FileExistsError(
                f"{output} is in use by another run: pid {holder['pid']} on host {holder['host']}, started "
                f"{holder['started']}; wait for it to finish (if it is gone, delete {lock})"
            ) from None
        with os.fdopen(handle, "w") as file:
            file.write(json.dumps(me) + "\n")
        return lock
    raise FileExistsError(f"{lock} was taken by another run while this one took over its stale lock")


def release_output_lock(lock: Path) -> None:
    """Remove the lock if it is still this process's (never another run's)."""
    holder = lock_holder(lock)
    if holder is not None and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[bool]:
    """Hold OUTPUT/.lock for the whole run; rank 0 takes it, and every rank stops if it could not. Yields whether
    the folder existed before (taking the lock creates it)."""
    lock, error, existed = None, None, output.is_dir()
    if distributed.is_main():
        try:
            lock = take_output_lock(output)
        except FileExistsError as caught:
            error = caught
    if distributed.sum_over_ranks([float(error is not None)])[0]:  # a collective: every rank learns the outcome
        raise error or FileExistsError(f"{output} is in use by another run (see rank 0's message)")
    try:
        yield existed
    finally:
        if lock is not None:
            release_output_lock(lock)


def is_run_entry(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a file or folder name is one a run writes (or atomic.py's leftover of one)."""
    leftover = ATOMIC_LEFTOVER.fullmatch(name)
    return any(fnmatch.fnmatchcase(leftover.group(1) if leftover else name, pattern) for pattern in patterns)


def foreign_entries(output: Path, folder: str = "") -> list[str]:
    """Paths under `output` that no run writes (notes, data, .git...), relative to it: what --overwrite must keep."""
    foreign = []
    for entry in sorted((output / folder).iterdir()):
        name = f"{folder}/{entry.name}" if folder else entry.name
        if not is_run_entry(entry.name, RUN_ENTRIES[folder]):
            foreign.append(name)
        elif entry.is_dir() and not entry.is_symlink() and name in RUN_ENTRIES:
            foreign += foreign_entries(output, name)
    return foreign


def check_overwrite(output: Path, has_run: bool) -> None:
    """Refuse --overwrite on the current folder or one above it, and a run's folder holding anything a run did not
    write: it would be deleted with the run."""
    if Path.cwd().resolve().is_relative_to(output.resolve()):
        raise ValueError(f"--overwrite --output {str(output)!r} is the current folder or one above it; give the "
                         "run's own folder")
    foreign = foreign_entries(output) if has_run else []
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise FileExistsError(f"--overwrite: {output} holds files no run writes ({shown}); move them away or "
                              "choose another --output (nothing was deleted)")


def prepare_output(config: TrainConfig, existed: bool = True) -> Path:
    """Refuse to mix a new run into an old one unless told to resume or overwrite; rank 0 alone touches disk.

    existed: whether the folder was there before the lock created it (output_lock), for --resume's message.
    """
    output = Path(config.output)
    has_run = output.is_dir() and any(
        (output / name).exists() for name in ("log.jsonl", "adapter_config.json", "checkpoints")
    )
    if config.overwrite:
        check_overwrite(output, has_run)
    if has_run and not (config.resume or config.overwrite):
        raise FileExistsError(f"{output} already holds a run; pass --resume to continue it or --overwrite")
    distributed.barrier()  # every rank has looked before rank 0 deletes anything
    if has_run and config.overwrite and distributed.is_main():
        for entry in output.iterdir():  # check_overwrite found only a run's entries
            if entry.name != LOCK_NAME:  # the lock stays: this run holds it
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    if distributed.is_main():
        output.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    if config.resume and not has_run:  # e.g. a preemptible job's first start: not an error, but never silent
        found = ("holds no run (no log.jsonl, adapter or checkpoints/)" if existed else
                 "does not exist, so there is no run to resume")
        distributed.print_main(f"--resume: {output} {found}; starting a new one there", file=sys.stderr)
    if config.resume:
        check_resumed_config(config, output / TRAIN_CONFIG_NAME)
    return output


def changed_settings(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(name, old, new) of every setting both hold with different values; nested dicts (lora) as 'lora.r'."""
    changes = []
    for name in now:
        if name not in saved:
            continue  # a setting this version added: the saved run had its default
        # Only the lora section is read key by key: a dict setting inside it (rank_pattern) is one value, so a key
        # added to it is a change, not "a setting this version added".
        if not prefix and isinstance(now[name], dict) and isinstance(saved[name], dict):
            changes += changed_settings(saved[name], now[name], f"{prefix}{name}.")
        elif now[name] != saved[name]:
            changes.append((f"{prefix}{name}", saved[name], now[name]))
    return changes


def read_saved_config(output: Path) -> dict[str, Any] | None:
    """The settings a run in `output` saved (train_config.json), or None when it saved none; the one reader."""
    path = output / TRAIN_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot resume: {path} is not valid JSON ({error})") from error
    if isinstance(saved, dict) and saved.get("eval_split") == "test":  # exactly what unset means: a hub id's 'test',
        saved["eval_split"] = None  # and all of a local file (which runs before eval_split could be unset read whole)
    return saved


def check_resumed_config(config: TrainConfig, saved_path: Path) -> None:
    """Refuse to resume with settings other than the saved run's, but those RESUME_MAY_CHANGE allows."""
    saved = read_saved_config(saved_path.parent)
    if saved is None:
        return
    now = json.loads(json.dumps(dataclasses.asdict(config)))  # as it would be saved: tuples as lists
    refused = [change for change in changed_settings(saved, now) if change[0] not in RESUME_MAY_CHANGE]
    if refused:
        listed = ", ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in refused)
        raise ValueError(
            f"--resume with changed settings ({listed}); the checkpoints were trained with the old values in "
            f"{saved_path}. Resume with those, or start a new run (another --output, or --overwrite). A resume "
            f"may change only: {', '.join(RESUME_MAY_CHANGE)}"
        )
    if config.group_by_length and saved.get("grad_accum", config.grad_accum) != config.grad_accum:
        # the global batch is checked against the checkpoint; with it fixed, another grad_accum means another
        # micro-batch (batch_size x processes), and data.batch_indices sorts by length within chunks of those
        raise ValueError(
            f"--resume with --group-by-length: grad_accum {saved['grad_accum']} -> {config.grad_accum} changes "
            "which pairs share a micro-batch (pairs are sorted by length within chunks of micro-batches), so the run "
            f"would not replay; keep --grad-accum {saved['grad_accum']} (the processes may change with --batch-size, "
            "e.g. 2 x 4 -> 1 x 8)"
        )


def write_config(config: TrainConfig, output: Path) -> None:
    """train_config.json: the settings that run (after check_resumed_config), written atomically."""
    settings = {name: value for name, value in dataclasses.asdict(config).items() if name not in NOT_SAVED}
    with atomic_path(output / TRAIN_CONFIG_NAME) as tmp:  # not write_json: max_grad_norm may be inf (Infinity)
        Path(tmp).write_text(json.dumps(settings, indent=2))


def write_final_metrics(output: Path, final: dict[str, Any], write: bool) -> None:
    """eval_metrics.json and reward_stats.json (NaN and inf as null, as eval prints them); then fail as eval does."""
    if write:
        write_json(output / "reward_stats.json", finite_or_none(final["reward_stats"]))
        write_json(output / "eval_metrics.json", finite_or_none(final))
    if finite_or_none(final) != final:
        raise ValueError(f"the final evaluation's metrics are NaN or inf (null in {output}/eval_metrics.json): "
                         "the adapter's rewards are not finite")
