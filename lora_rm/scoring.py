"""Loading a reward model and scoring with it: what `lora-rm eval`, `score`, `merge` and the trainer share.

The reward of a text is the score head's output at its last real token (lora_rm/data.py says which token
that is). Pairs are scored in one forward: chosen rows first, then rejected rows, padded right as TRL does.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data
from .adapter_io import load_adapter
from .config import BUILTIN, DTYPES
from .loss import preference_metrics, reward_stats, split_rewards


def torch_dtype(name: str) -> torch.dtype:
    """torch.float32 for "fp32", and so on (config.DTYPES)."""
    return getattr(torch, DTYPES[name])


def load_model_and_tokenizer(
    name: str,
    trust_remote_code: bool = False,
    base_dtype: str = "fp32",
    load_in_4bit: bool = False,
    bnb_4bit_compute_dtype: str = "bf16",
    device: str | torch.device | None = None,
):
    """A (model, tokenizer) pair with a pad token on both; "builtin" builds the same tiny offline model each time.

    The base is stored in base_dtype (its linear layers in nf4 with load_in_4bit, on `device`); what trains
    (adapter and head) is kept fp32 by add_lora.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    dtype = torch_dtype(base_dtype)
    if name == BUILTIN:
        from .builtin import builtin_model, builtin_tokenizer

        tokenizer = builtin_tokenizer()
        model = builtin_model(tokenizer).to(dtype)
        if load_in_4bit:  # quantization happens while loading: go through a folder
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder)
                return load_quantized(folder, dtype, bnb_4bit_compute_dtype, device, False), tokenizer
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if load_in_4bit:
        model = load_quantized(name, dtype, bnb_4bit_compute_dtype, device, trust_remote_code)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code
        )
    message = data.ensure_pad_token(tokenizer, model)
    if message:
        print(message)
    return model, tokenizer


def load_quantized(name: str, dtype: torch.dtype, compute_dtype: str, device, trust_remote_code: bool) -> nn.Module:
    """The base with nf4 linear layers, placed on `device` while loading (a 4-bit model is not moved afterwards)."""
    from transformers import AutoModelForSequenceClassification

    from .qlora import prepare_4bit_model, quantization_config

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForSequenceClassification.from_pretrained(
        name, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code,
        quantization_config=quantization_config(torch_dtype(compute_dtype)), device_map={"": device},
    )
    return prepare_4bit_model(model)


def load_reward_model(model_name: str, adapter: str | Path, **load_options):
    """Base model (load_model_and_tokenizer's options) + saved adapter, in eval mode: (model, tokenizer)."""
    model, tokenizer = load_model_and_tokenizer(model_name, **load_options)
    return load_adapter(model, adapter).eval(), tokenizer


def pair_collator(tokenizer) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """collate_pairs bound to this tokenizer's pad id."""
    return functools.partial(data.collate_pairs, pad_token_id=tokenizer.pad_token_id)


def autocast_context(precision: str, device: torch.device):
    """bf16/fp16 autocast (the loss itself is computed in fp32 by bradley_terry_loss)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def pair_rewards(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over chosen rows then rejected rows; the reward is read at each row's last real token."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return split_rewards(logits.float())  # (2B, 1) -> (B,), (B,)


@torch.no_grad()
def rewards_for_pairs(model, pairs, collator, batch_size: int, device, precision: str = "fp32"):
    """(chosen, rejected) rewards of every pair, in order, as two CPU fp32 tensors."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collator(pairs[start : start + batch_size]).items()}
        with autocast_context(precision, device):
            rewards_chosen, rewards_rejected = pair_rewards(model, batch)
        chosen.append(rewards_chosen.cpu())
        rejected.append(rewards_rejected.cpu())
    model.train(was_training)
    if not chosen:  # a rank whose eval shard is empty
        return torch.empty(0), torch.empty(0)
    return torch.cat(chosen), torch.cat(rejected)


def eval_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, Any]:
    """Preference metrics plus the reward mean/std a policy trainer normalises with."""
    return {
        **preference_metrics(chosen, rejected),
        "n_pairs": len(chosen),
        "reward_stats": reward_stats(torch.cat([chosen, rejected])),
    }


def evaluate_dataset(
    model, tokenizer, dataset, max_length: int | None, length_policy: str = "drop", skip_bad_rows: bool = False,
    batch_size: int = 8, report: str | Path | None = None, log: str | Path | None = None,
) -> tuple[dict[str, Any], data.DataStats, list[Path]]:
    """Tokenize preference rows, score them and optionally write the reward report: (metrics, stats, report files)."""
    tokenized, stats = data.tokenize_pairs(dataset, tokenizer, max_length, length_policy, skip_bad_rows)
    pairs = tokenized.to_list()
    device = next(model.parameters()).device
    chosen, rejected = rewards_for_pairs(model, pairs, pair_collator(tokenizer), batch_size, device)
    metrics = eval_metrics(chosen, rejected)
    written = []
    if report:
        from .report import write_report  # matplotlib is optional

        lengths_chosen = [len(pair["chosen_ids"]) for pair in pairs]
        lengths_rejected = [len(pair["rejected_ids"]) for pair in pairs]
        written = write_report(report, chosen, rejected, lengths_chosen, lengths_rejected, metrics, log)
    return metrics, stats, written


@torch.no_grad()
def score_texts(model, tokenizer, items: list, max_length: int | None = None, batch_size: int = 8) -> list[float]:
    """One reward per text (or chat), encoded exactly as training encoded each side (EOS included)."""
    device = next(model.parameters()).device
    rewards = []
    for start in range(0, len(items), batch_size):
        sides = [data.encode_text(tokenizer, None, item) for item in items[start : start + batch_size]]
        too_long = [start + i for i, ids in enumerate(sides) if max_length and len(ids) > max_length]
        if too_long:
            raise ValueError(f"texts {too_long} are longer than max_length={max_length} tokens")
        input_ids, attention_mask = data.pad_sequences(sides, tokenizer.pad_token_id, "right")
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
        rewards.extend(logits.squeeze(-1).float().tolist())
    return rewards
