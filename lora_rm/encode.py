"""How one text becomes token ids, shared by every data shape (pairs in data.py, K-way rows in ranking.py).

encode_text is TRL 1.16's rule for one side (prompt + completion, EOS appended); side_problem says why a column
value cannot be used; pad_sequences pads sides into a batch. DataStats counts what tokenization kept and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

UNK_CHECK_PAIRS = 64  # tokenize_pairs stops when over half the tokens of this many pairs are the unknown token


def is_messages(value: Any) -> bool:
    """Whether a column value is a conversation: a list of {role, content} messages."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


# tokenizer_config.json key set by model_io.save_tokenizer: this tokenizer's post-processor appends EOS itself.
APPENDS_EOS = "lora_rm_appends_eos"


def encode_text(
    tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict] | None, completion: str | list[dict]
) -> list[int]:
    """Token ids of one side (prompt + completion) as TRL 1.16's RewardTrainer makes them; train, eval, score.

    Text: EOS is appended to the completion unless already there, then the tokenizer adds its own special
    tokens (Llama's BOS, BERT's [CLS] ... [SEP]). A tokenizer without an EOS (BERT) gets none: its [SEP]
    already closes the text, where TRL would fail on `str.endswith(None)`. A tokenizer lora-rm saved
    (APPENDS_EOS) appends the EOS itself: the same ids. Messages: the chat template alone decides; no EOS is added.
    """
    if isinstance(completion, list):
        messages = list(prompt or []) + completion
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    eos = tokenizer.eos_token
    if eos is not None and tokenizer.init_kwargs.get(APPENDS_EOS):
        completion = completion.removesuffix(eos)
    elif eos is not None and not completion.endswith(eos):
        completion = completion + eos
    return list(tokenizer(text=(prompt or "") + completion)["input_ids"])


def side_problem(name: str, value: Any, conversational: bool) -> str | None:
    """Why one column value cannot be used, or None; a prompt may be empty, a completion may not."""
    if value is None:
        return f"{name} is missing"
    if conversational:
        if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        ):
            return f"{name} is not a list of {{role, content}} messages"
        return f"{name} has no messages" if not value and name != "prompt" else None
    if not isinstance(value, str):
        return f"{name} is not text but {type(value).__name__}"
    return f"{name} is empty" if not value.strip() and name != "prompt" else None


@dataclass
class DataStats:
    """What tokenization did to a dataset; printed so that nothing is dropped silently."""

    n_rows: int = 0  # rows read
    n_kept: int = 0  # pairs that go on to training or evaluation
    n_dropped_too_long: int = 0  # length_policy="drop": a side had more than max_length tokens
    n_truncated: int = 0  # length_policy="truncate_left": pairs with a side cut from the left
    n_bad_skipped: int = 0  # skip_bad_rows=True: rows with a missing, empty, non-text or identical value


def check_unknown_share(ids: list[int], n_rows: int, tokenizer: PreTrainedTokenizerBase, what: str = "pairs") -> None:
    """The check of _check_known_tokens on the token ids of the first n_rows pairs (or K-way rows)."""
    n_unknown = ids.count(tokenizer.unk_token_id) if tokenizer.unk_token_id is not None else 0
    if 2 * n_unknown > len(ids):
        name = tokenizer.name_or_path or "the built-in model"
        raise ValueError(
            f"{n_unknown} of the {len(ids)} tokens of the first {n_rows} {what} are the unknown token "
            f"{tokenizer.unk_token!r}: the tokenizer of {name} does not know the words of this data. Pass a --model "
            "whose tokenizer does (--model builtin is a 30-token arithmetic demo: 'What is', '+', '?', 0 to 18)"
        )


def pad_sequences(
    sequences: list[list[int]], pad_token_id: int, padding_side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (N, longest): pads on `padding_side`, the mask 1 over each sequence's ids."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, ids in enumerate(sequences):
        start = longest - len(ids) if padding_side == "left" else 0
        input_ids[i, start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, start : start + len(ids)] = 1
    return input_ids, attention_mask
