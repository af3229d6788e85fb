"""Scoring a file of any size: `lora-rm score --input in.jsonl --output out.jsonl`, streamed, resumable, torchrun-able.

Rows are read one window at a time (--window rows): a window is tokenized, sorted by length, scored in batches and
appended to the output in input order as `{"id": ..., "reward": ...}` lines, so memory holds one window, never
the file. The output is its own resume point. Each window is appended with one write and an fsync, so after a kill
the file holds whole windows and maybe the start of the next one, a torn last line included. Rerunning the same
command keeps the whole windows (their ids checked against the input), cuts the rest, and goes on from the first
window not fully written: that window is scored again whole, in the very batches of an uninterrupted run, so the
file ends byte for byte the same. Under torchrun every rank reads the input and scores its contiguous share of
each window; the rewards are gathered in order and rank 0 writes.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import distributed, encode
from .evaluate import encode_item, longest_text, score_by_length
from .packing import resolve_packing

SCORE_LINE_START = b'{"id": '  # how every line score_line writes begins
Row = tuple[int, Any, Any]  # (1-based input line number, id, item): item as evaluate.encode_item takes it


def row_item(record: dict[str, Any], where: str) -> Any:
    """The text, chat or (prompt, response) tuple of one JSON input object, checked; `where` names it in errors."""
    if "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError(f"{where}: 'text' must be a string, not {type(record['text']).__name__} "
                             f"({record['text']!r:.40})")
        return record["text"]
    if "messages" in record:
        if problem := encode.side_problem("messages", record["messages"], conversational=True):
            raise ValueError(f"{where}: {problem}")
        return record["messages"]
    if "prompt" in record and "response" in record:
        conversational = encode.is_messages(record["response"])
        for name in ("prompt", "response"):
            if problem := encode.side_problem(name, record[name], conversational):
                raise ValueError(f"{where}: {problem} (a text prompt goes with a text response, messages with "
                                 "messages)")
        return record["prompt"], record["response"]
    raise ValueError(f"{where}: a JSON object needs a 'text', 'messages', or 'prompt' and 'response' field")


def parse_line(line: str, number: int) -> Row | None:
    """(number, id, item) of one input line, or None when it is blank; the id is the object's "id", else number.

    A JSON object holds "text", "messages", or "prompt" and "response"; any other line is a text as it stands.
    """
    text = line.removesuffix("\n").removesuffix("\r")
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return number, number, text
    if not isinstance(record, dict):  # e.g. "42": plain text that happens to parse as JSON
        return number, number, text
    return number, record.get("id", number), row_item(record, f"score input line {number}")


def read_rows(lines: Iterable[str]) -> Iterator[Row]:
    """Every non-blank input line as a Row, numbered from 1 (blank lines count in the numbering, give no row)."""
    for number, line in enumerate(lines, 1):
        row = parse_line(line, number)
        if row is not None:
            yield row


def windows(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    """Consecutive lists of `size` rows (the last one shorter)."""
    while window := list(itertools.islice(rows, size)):
        yield window


def written_lines(output: Path) -> Iterator[tuple[Any, float | None, int]]:
    """(id, reward, byte offset just after the line) of each complete line of a score output; a torn last line ends
    it."""
    with open(output, "rb") as handle:
        offset = 0
        for number, line in enumerate(handle, 1):
            if not line.endswith(b"\n") and (line.startswith(SCORE_LINE_START) or SCORE_LINE_START.startswith(line)):
                return  # torn by a kill during the write (a score line's start, or a piece of it): written again
            offset += len(line)
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if not (isinstance(record, dict) and record.keys() == {"id", "reward"}):
                raise ValueError(f"--output {output} line {number} is not a score line ({line[:40]!r}): not a "
                                 "`lora-rm score` output; delete it or choose another --output")
            yield record["id"], record["reward"], offset


def resume_point(output: Path, input_windows: Iterator[list[Row]]) -> tuple[int, int, int, list[Row] | None]:
    """(rows kept, bytes kept, null rewards kept, first window to score) of an existing output; reads input_windows
    up to that window.

    A window counts as done only when all its lines are there with the input's ids; the first other one is
    returned to be scored again whole (None: the input is done).
    """
    if not output.exists():
        return 0, 0, 0, None
    written = written_lines(output)
    rows_kept = bytes_kept = nulls_kept = 0
    for window in input_windows:
        lines = list(itertools.islice(written, len(window)))
        if len(lines) < len(window):
            return rows_kept, bytes_kept, nulls_kept, window
        for k, ((number, row_id, _), (written_id, _, _)) in enumerate(zip(window, lines, strict=True)):
            if written_id != row_id:
                raise ValueError(f"--output {output} line {rows_kept + k + 1} has id {written_id!r} where input "
                                 f"line {number} has id {row_id!r}: it was written from other input; delete it or "
                                 "choose another --output")
        rows_kept, bytes_kept = rows_kept + len(window), lines[-1][2]
        nulls_kept += sum(reward is None for _, reward, _ in lines)
    if next(written, None) is not None:
        raise ValueError(f"--output {output} has more lines than the input has rows ({rows_kept}): it was written "
                         "from other input; delete it or choose another --output")
    return rows_kept, bytes_kept, nulls_kept, None


def window_rewards(model, tokenizer, window: list[Row], max_length: int | None, batch_size: int,
                   mode: str) -> list[float]:
    """Every reward of one window in input order; under torchrun each rank scores its share, rank 0 gets all."""
    mine = distributed.shard(window)
    limit, limit_name = longest_text(model, max_length)
    sides = []
    for number, row_id, item in mine:
        ids = encode_item(tokenizer, item)
        if limit and len(ids) > limit:
            raise ValueError(f"score input line {number} (id {row_id!r}) has {len(ids)} tokens, over {limit_name}")
        sides.append(ids)
    rewards = score_by_length(model, tokenizer.pad_token_id, sides, batch_size, mode)
    return distributed.gather_cat(torch.tensor(rewards, dtype=torch.float64)).tolist()  # fp32 values, exactly


def score_line(row_id: Any, reward: float) -> str:
    """One output line; 9 significant digits give back the fp32 reward exactly; a non-finite reward is null."""
    value = float(f"{reward:.9g}") if math.isfinite(reward) else None
    return json.dumps({"id": row_id, "reward": value}, allow_nan=False) + "\n"


def append_window(handle, window: list[Row], rewards: list[float]) -> None:
    """Append one window's lines with one write, then fsync: a kill leaves whole windows and one torn tail."""
    handle.write("".join(score_line(row_id, reward) for (_, row_id, _), reward in zip(window, rewards,
                                                                                       strict=True)).encode())
    handle.flush()
    os.fsync(handle.fileno())


def count_rows(path: Path) -> int:
    """Non-blank lines of the input, for the progress bar's total."""
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def open_output(output: Path, bytes_kept: int):
    """The output opened for appending after its first bytes_kept bytes (created, and its folder synced, if new)."""
    if not output.exists():
        output.touch()
        folder = os.open(output.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the new name itself survives a power cut
        finally:
            os.close(folder)
    handle = open(output, "r+b")
    handle.truncate(bytes_kept)
    handle.seek(bytes_kept)
    return handle


def score_file(model, tokenizer, input_path: str | Path, output: str | Path, max_length: int | None = None,
               batch_size: int = 8, packing: str = "auto", window: int = 1024, progress: bool = True) -> dict:
    """Stream input_path's rows into output's `{"id", "reward"}` lines, resuming a cut run: {rows, resumed, nonfinite}.

    Every rank (torchrun) calls it with the same files; rank 0 alone writes.
    """
    input_path, output = Path(input_path), Path(output)
    if not input_path.is_file():
        raise FileNotFoundError(f"--input {input_path}: no such file")
    mode = resolve_packing(packing, model, lambda message: None)
    with open(input_path, encoding="utf-8", newline="\n") as lines:  # lines end at \n only, as count_rows counts
        input_windows = windows(read_rows(lines), window)
        rows_kept, bytes_kept, nonfinite, pending = resume_point(output, input_windows)
        if distributed.sum_over_ranks([rows_kept])[0] != rows_kept * distributed.world_size():
            raise ValueError(f"--output {output}: the processes see different files there (a path local to each "
                             "node?); give a path every process shares")
        distributed.barrier()  # every rank has read the old output before rank 0 cuts it
        handle = open_output(output, bytes_kept) if distributed.is_main() else None
        show = progress and distributed.is_main() and sys.stderr.isatty()
        bar = tqdm(total=count_rows(input_path) if show else None, initial=rows_kept, unit="rows", desc="score",
                   disable=not show)
        n_rows = rows_kept
        try:
            for rows in itertools.chain([pending] if pending else [], input_windows):
                rewards = window_rewards(model, tokenizer, rows, max_length, batch_size, mode)
                if handle is not None:
                    append_window(handle, rows, rewards)
                n_rows += len(rows)
                nonfinite += sum(not math.isfinite(reward) for reward in rewards)
                bar.update(len(rows))
        finally:
            bar.close()
            if handle is not None:
                handle.close()
    return {"rows": n_rows, "resumed": rows_kept, "nonfinite": nonfinite}
