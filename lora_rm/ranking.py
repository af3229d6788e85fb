"""Rankings of K answers: the two K-way row shapes, their tokenization, losses and metrics.

A K-way row is a group of K >= 2 responses to one prompt, each with a score (higher is better; equal scores mean
no preference between those two). Two shapes beside the pairs of data.py, in every text form (implicit, explicit
`prompt`, conversational):
  responses  `responses` (K texts or message lists) and `scores` (K numbers)
  lists      RewardBench 2's `chosen` and `rejected` as lists: every chosen (score 1) above every rejected (score 0)

Each response is tokenized as a pair's side is (encode.encode_text, TRL's rule) and the group is stored best first
(a stable sort by score), so a K = 2 row is laid out exactly as the pair it describes. A micro-batch stacks every
sequence of its rows into one padded forward, position-major (the best response of every row, then the second,
...): with K = 2 that is collate_pairs' chosen-then-rejected layout, so both losses below reduce to
loss.bradley_terry_loss bit for bit. The losses read only `group` (the row of each sequence) and `scores`, plus
what collate_groups works out from them on the host (the pairs, the number of rows), so another layout (a shared
prompt) needs no other change.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from datasets import Dataset
from torch import Tensor

from . import encode
from .data_files import ROW_PROBLEM, ROW_SOURCE
from .loss import ordered_pairs

RESPONSES, LISTS = "responses", "lists"  # the two K-way row shapes


def ranking_shape(dataset: Dataset) -> str | None:
    """'responses', 'lists' (chosen and rejected hold lists of responses) or None for pair rows."""
    columns = set(dataset.column_names)
    if "responses" in columns:
        if "scores" not in columns:
            raise ValueError(f"K-way rows with `responses` need a `scores` column; the data has {sorted(columns)}")
        return RESPONSES
    if "chosen" not in columns or "rejected" not in columns:
        return None
    first = next((v for v in dataset["chosen"] if isinstance(v, str) or (isinstance(v, list) and v)), None)
    if isinstance(first, list) and isinstance(first[0], (str, list)):  # a list of texts or of message lists
        return LISTS
    return None


def is_ranking_rows(rows: list[dict[str, Any]]) -> bool:
    """Whether tokenized rows are K-way groups (tokenize_rankings) rather than pairs."""
    return bool(rows) and "responses_ids" in rows[0]


def _responses_and_scores(row: dict[str, Any], shape: str) -> tuple[Any, Any, str | None]:
    """(responses, scores, problem) of one row in either shape; problem is None when the row can be used."""
    if shape == LISTS:
        for name in ("chosen", "rejected"):
            if not isinstance(row[name], list) or not row[name]:
                return None, None, f"{name} is not a non-empty list of responses"
        return row["chosen"] + row["rejected"], [1.0] * len(row["chosen"]) + [0.0] * len(row["rejected"]), None
    responses, scores = row["responses"], row["scores"]
    if not isinstance(responses, list) or len(responses) < 2:
        return None, None, "responses is not a list of at least 2 responses"
    if not isinstance(scores, list) or len(scores) != len(responses):
        found = f"{len(scores)} scores" if isinstance(scores, list) else f"scores of type {type(scores).__name__}"
        return None, None, f"{len(responses)} responses but {found}"
    for k, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            shown = "null or NaN (the loader reads a JSON NaN as null)" if score is None else repr(score)
            return None, None, f"scores[{k}] is not a finite number: {shown}"
    stored = torch.tensor([float(score) for score in scores], dtype=torch.float32).tolist()  # as collate_groups
    if not all(math.isfinite(score) for score in stored):
        return None, None, f"scores {scores} overflow float32, the dtype they are trained in"
    if len(set(stored)) == 1:  # 16777217 and 16777216 differ, but not in float32: no pair, a NaN loss
        return None, None, "all scores are equal (in float32, the dtype they are trained in): the row prefers no "\
                           "response"
    return responses, stored, None


def _row_problem(row: dict[str, Any], shape: str, conversational: bool) -> str | None:
    """Why a K-way row cannot be used, or None (data._row_problem's rules, per response)."""
    if row.get(ROW_PROBLEM):  # a line that did not read as a row (data_files, with skip_bad_rows)
        return row[ROW_PROBLEM]
    if "margin" in row and not (isinstance(row["margin"], (int, float)) and math.isfinite(row["margin"])):
        return f"margin is not a finite number: {row['margin']!r}"
    responses, scores, problem = _responses_and_scores(row, shape)
    if problem:
        return problem
    if "prompt" in row and (problem := encode.side_problem("prompt", row["prompt"], conversational)):
        return problem
    name = "responses" if shape == RESPONSES else "chosen + rejected"
    for k, response in enumerate(responses):
        if problem := encode.side_problem(f"{name}[{k}]", response, conversational):
            return problem
    return None


def _identical_but_scored_apart(sides: list, scores: list[float]) -> tuple[int, int] | None:
    """The first two positions holding the same response with different scores: a row that contradicts itself."""
    for i in range(len(sides)):
        for j in range(i + 1, len(sides)):
            if sides[i] == sides[j] and scores[i] != scores[j]:
                return i, j
    return None


def _encode_ranking_row(
    row: dict[str, Any], index: int, tokenizer, shape: str, conversational: bool, max_length: int | None,
    length_policy: str, skip_bad_rows: bool,
) -> dict[str, Any]:
    """One K-way row to responses_ids (best first), scores, length (the longest) and status (data._encode_row's)."""
    problem = _row_problem(row, shape, conversational)
    if problem is None:
        responses, scores, _ = _responses_and_scores(row, shape)
        ids = [encode.encode_text(tokenizer, row.get("prompt"), response) for response in responses]
        if same := _identical_but_scored_apart(responses, scores):
            problem = f"responses {same[0]} and {same[1]} are identical but scored differently"
        elif same := _identical_but_scored_apart(ids, scores):
            problem = f"responses {same[0]} and {same[1]} tokenize to the same ids but are scored differently"
    if problem is not None:
        if not skip_bad_rows:
            where = row.get(ROW_SOURCE) or f"row {index}"
            raise ValueError(f"{where}: {problem} (pass --skip-bad-rows to skip such rows)")
        return {"responses_ids": [], "scores": [], "length": 0, "status": "bad"}
    best_first = sorted(range(len(ids)), key=lambda k: -scores[k])  # stable: equal scores keep their order
    ids, scores = [ids[k] for k in best_first], [scores[k] for k in best_first]
    status = "ok"
    if max_length is not None and max(len(side) for side in ids) > max_length:
        if length_policy == "drop":
            status = "too_long"
        else:  # as pairs: keep the end of each response, where the reward is read
            status, ids = "truncated", [side[-max_length:] for side in ids]
    return {"responses_ids": ids, "scores": scores, "length": max(len(side) for side in ids), "status": status}


def tokenize_rankings(
    dataset: Dataset, tokenizer, max_length: int | None = None, length_policy: str = "drop",
    skip_bad_rows: bool = False,
) -> tuple[Dataset, encode.DataStats]:
    """data.tokenize_pairs for K-way rows: columns responses_ids, scores, length and margin if any.

    A row is dropped (or each response cut from the left) when any of its responses is over max_length.
    """
    shape = ranking_shape(dataset)
    column = "responses" if shape == RESPONSES else "chosen"
    first = next((v for v in dataset[column] if isinstance(v, list) and v), [None])
    conversational = encode.is_messages(first[0])
    sample = dataset.select(range(min(encode.UNK_CHECK_PAIRS, len(dataset))))
    ids = [
        token
        for row in sample
        if _row_problem(row, shape, conversational) is None
        for response in _responses_and_scores(row, shape)[0]
        for token in encode.encode_text(tokenizer, row.get("prompt"), response)
    ]
    encode.check_unknown_share(ids, len(sample), tokenizer, "K-way rows")
    kwargs = dict(tokenizer=tokenizer, shape=shape, conversational=conversational, max_length=max_length,
                  length_policy=length_policy, skip_bad_rows=skip_bad_rows)
    encoded = dataset.map(
        _encode_ranking_row, fn_kwargs=kwargs, with_indices=True, keep_in_memory=True, desc="Tokenizing K-way rows",
        remove_columns=[c for c in dataset.column_names if c != "margin"],
    )
    statuses = encoded["status"]
    counts = Counter(statuses)
    kept = [i for i, status in enumerate(statuses) if status in ("ok", "truncated")]
    stats = encode.DataStats(n_rows=len(dataset), n_kept=len(kept), n_dropped_too_long=counts["too_long"],
                           n_truncated=counts["truncated"], n_bad_skipped=counts["bad"])
    return encoded.select(kept).remove_columns("status"), stats


def collate_groups(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, Tensor]:
    """Every response of every row in one right-padded batch, position-major; `group` names each sequence's row.

    Position-major (the best of every row, then the second of every row that has one, ...) makes a batch of
    K = 2 rows the very batch collate_pairs makes of the same pairs. The pairs the losses compare and the
    number of rows are worked out here, on the host, so a training step on a GPU never waits to learn them.
    """
    order = [(b, k) for k in range(max(len(r["responses_ids"]) for r in rows))
             for b, row in enumerate(rows) if k < len(row["responses_ids"])]
    sequences = [rows[b]["responses_ids"][k] for b, k in order]
    input_ids, attention_mask = encode.pad_sequences(sequences, pad_token_id, "right")  # (N, L) each
    group = torch.tensor([b for b, _ in order], dtype=torch.long)  # (N,)
    scores = torch.tensor([float(rows[b]["scores"][k]) for b, k in order], dtype=torch.float32)  # (N,)
    better, worse = ordered_pairs(group, scores)  # (P,) each
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "group": group,
        "scores": scores,
        "better": better,
        "worse": worse,
        "row_sizes": torch.tensor([len(row["responses_ids"]) for row in rows], dtype=torch.long),  # (B,)
    }
    if "margin" in rows[0]:
        batch["margin"] = torch.tensor([float(row["margin"]) for row in rows], dtype=torch.float32)  # (B,)
    return batch


