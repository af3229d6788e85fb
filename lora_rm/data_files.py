"""Reading preference files exactly: JSON/JSONL(.gz)/CSV cells as written, each row remembering its file and line.

JSON and CSV are read with the standard library, each cell as written: datasets' readers retype a whole column
after one odd cell (a number among texts makes every JSON-like text decoded; CSV infers floats and reads "NA" as
missing), so one bad cell would spoil good rows. Parquet has a real schema, so datasets reads it as written.
Every row keeps where it came from (file and 1-based line, or parquet row index) in the column ROW_SOURCE, which
survives any row selection, so that an error about a row names it.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, load_dataset

FILE_KINDS = {  # extension -> how the file is read; the first match wins, so double extensions come first
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
ROW_SOURCE = "_row_source"  # "pairs.jsonl line 37": where a row was read, named by errors about it
ROW_PROBLEM = "_row_problem"  # with skip_bad_rows, a line that is no row: why (the tokenizer skips and counts it)
JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


def file_kind(path: Path) -> str | None:
    """'json', 'parquet' or 'csv' for a data file, from its (possibly double) extension; None for any other file."""
    return next((kind for ext, kind in FILE_KINDS.items() if path.name.endswith(ext)), None)


def find_preference_files(source: str) -> list[Path]:
    """The data files `source` names (a file, or a folder searched recursively); [] when it is no local path."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and file_kind(p))
        if not files:
            raise FileNotFoundError(f"folder {source} holds no {', '.join(FILE_KINDS)} files")
        return files
    if path.is_file():
        return [path]
    if file_kind(path) or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such data file or folder: {source}")
    return []  # a hub id


def read_preference_files(source: str, files: list[Path], skip_bad_rows: bool = False) -> Dataset:
    """All rows of `files` (one kind, which `source` names in errors) as one Dataset, with ROW_SOURCE per row.

    skip_bad_rows: a JSON Lines line that is not a JSON object becomes a row holding only ROW_PROBLEM (and
    ROW_SOURCE), which tokenizing skips, counts and names; without it the first one is an error naming its line.
    """
    kinds = {file_kind(p) for p in files}
    if None in kinds or len(kinds) > 1:
        names = [p.name for p in files]
        raise ValueError(f"{source}: cannot tell one file type from the extensions of {names}")
    kind = kinds.pop()
    if kind == "parquet":
        dataset = load_dataset("parquet", data_files=[str(p) for p in files], split="train")
        where = [f"{p} row index {i}" for p in files for i in range(pq.ParquetFile(p).metadata.num_rows)]
        return dataset.add_column(ROW_SOURCE, where)
    return _dataset_from_rows([row for p in files for row in _read_file(p, kind, skip_bad_rows)])


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each line of a UTF-8 file, gzip-compressed or not."""
    opener = gzip.open if path.name.endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as file:
            for number, raw in enumerate(file, 1):
                try:
                    yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    message = f"not UTF-8 text ({err.reason} at byte {err.start})"
                    raise ValueError(f"{path} line {number}: {message}") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: not a whole gzip file, unreadable after line {number} ({err})") from None


def _read_file(path: Path, kind: str, skip_bad_rows: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) for each row of a JSON Lines, JSON array or CSV file; a file without rows is an error."""
    reader = _read_json(path, skip_bad_rows) if kind == "json" else _read_csv(path)
    rows = [(f"{path} line {number}", row) for number, row in reader]
    for index, (where, row) in enumerate(rows):
        if not isinstance(row, dict):
            problem = f"a row must be a JSON object of columns, not {type(row).__name__}"
            if not skip_bad_rows:
                raise ValueError(f"{where}: {problem}")
            rows[index] = (where, {ROW_PROBLEM: problem})
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def _read_json(path: Path, skip_bad_rows: bool = False) -> Iterator[tuple[int, Any]]:
    """(line, value) of each row of a JSON Lines file, or of a file holding one JSON array, as datasets reads; with
    skip_bad_rows a JSON Lines line that does not parse yields {ROW_PROBLEM: why} (an array is all or nothing)."""
    lines = _read_lines(path)
    for number, line in lines:
        try:
            if line.lstrip().startswith("["):  # the rest of the file is one array
                yield from _json_array(line + "".join(text for _, text in lines), number)
                return
            if line.strip():
                yield number, json.loads(line)
        except json.JSONDecodeError as err:
            line_number, problem = json_error_where(err, number)
            if not skip_bad_rows or line_number != number or line.lstrip().startswith("["):
                raise ValueError(f"{path} line {line_number}: {problem}") from None
            yield number, {ROW_PROBLEM: problem}


def json_error_where(err: json.JSONDecodeError, first_line: int) -> tuple[int, str]:
    """(file line, 'not valid JSON: ...') of a decode error in text that starts at `first_line`; an error past the
    last character is the text ending inside a value (a file cut short), named at its last line, not the next."""
    content_end = len(err.doc.rstrip())
    if err.pos >= content_end:
        last_line = first_line + err.doc.count("\n", 0, content_end)
        return last_line, f"not valid JSON: the text ends inside a value ({err.msg}): cut short?"
    return first_line + err.lineno - 1, f"not valid JSON: {err.msg} (column {err.colno})"


def _json_array(text: str, first_line: int) -> Iterator[tuple[int, Any]]:
    """(line where it starts, value) of each element of the JSON array that `text`, from `first_line`, holds."""
    decoder = json.JSONDecoder()
    position = JSON_WHITESPACE.match(text, text.index("[") + 1).end()
    line, counted = first_line, 0
    while not text.startswith("]", position):
        value, end = decoder.raw_decode(text, position)
        line, counted = line + text.count("\n", counted, position), position
        yield line, value
        position = JSON_WHITESPACE.match(text, end).end()
        if text.startswith(",", position):
            position = JSON_WHITESPACE.match(text, position + 1).end()
        elif not text.startswith("]", position):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, position)
    end = JSON_WHITESPACE.match(text, position + 1).end()
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)


def _read_csv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line where it starts, row) of each record after the header; cells stay text, margin becomes a number."""
    reader = csv.reader(text for _, text in _read_lines(path))
    names, start = None, 1
    try:
        for record in reader:
            if record and names is None:
                names = record
            elif record:
                if len(record) != len(names):
                    raise ValueError(f"{path} line {start}: {len(record)} fields under {len(names)} column names")
                row = dict(zip(names, record, strict=True))
                if "margin" in row:
                    row["margin"] = _number_or_text(row["margin"])
                yield start, row
            start = reader.line_num + 1
    except csv.Error as err:
        raise ValueError(f"{path} line {reader.line_num}: not valid CSV: {err}") from None


def _number_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text  # tokenize_pairs (data._row_problem) names it


def _shape(value: Any) -> str:
    """A JSON value's shape, int and float apart: 'str', 'list[int]', 'list[dict(content:str,role:str)]'."""
    if isinstance(value, list):
        return f"list[{'|'.join(sorted({_shape(v) for v in value}))}]"
    if isinstance(value, dict):
        return f"dict({','.join(f'{k}:{_shape(v)}' for k, v in sorted(value.items()))})"
    return type(value).__name__


def _dataset_from_rows(rows: list[tuple[str, dict[str, Any]]]) -> Dataset:
    """A Dataset whose every cell holds exactly the value read, with ROW_SOURCE naming where each row was read.

    A column of one shape (or of ints and floats, a margin) is stored as its arrow type; a column that mixes
    shapes (texts and one number, say) is stored as JSON text per cell, which datasets decodes cell by cell.
    """
    names = list(dict.fromkeys(name for _, row in rows for name in row))
    columns = {}
    for name in names:
        values = [row.get(name) for _, row in rows]
        shapes = {_shape(v) for v in values if v is not None}
        try:
            if len(shapes) <= 1 or shapes == {"int", "float"}:
                columns[name] = pa.array(values)
                continue
        except (pa.ArrowException, OverflowError):  # e.g. an integer beyond int64
            pass
        columns[name] = pa.array([None if v is None else json.dumps(v) for v in values], type=pa.json_())
    columns[ROW_SOURCE] = pa.array([where for where, _ in rows])
    return Dataset(pa.table(columns))
