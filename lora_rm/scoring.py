"""Loading a reward model and scoring with it: what `lora-rm eval`, `score`, `merge` and the trainer share.

The reward of a text is the score head's output at its last real token (lora_rm/data.py says which token
that is). Pairs are scored in one forward: chosen rows first, then rejected rows, padded right as TRL does.
save_tokenizer writes the tokenizer a trained or merged model is served with, so that plain transformers encodes
texts as training did.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data, encode, ranking
from .eval_stats import pair_report
from .loss import preference_metrics, reward_stats, split_rewards
from .model_io import autocast_context


def pair_collator(tokenizer) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """collate_pairs bound to this tokenizer's pad id."""
    return functools.partial(data.collate_pairs, pad_token_id=tokenizer.pad_token_id)


def batch_rewards(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over chosen rows then rejected rows; the reward is read at each row's last real token."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return split_rewards(logits.float())  # (2B, 1) -> (B,), (B,)


@torch.no_grad()
def rewards_for_pairs(model, pairs, collator, batch_size: int, device, precision: str = "fp32",
                      packing: str = "none", max_tokens_per_batch: int | None = None, pad_token_id: int | None = None):
    """(chosen, rejected) rewards of every pair, in order, as two CPU fp32 tensors.

    packing is a resolved mode (packing.resolve_packing); packed modes need the tokenizer's pad_token_id.
    """
    from .packing import pair_rewards

    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        with autocast_context(precision, device):
            if packing == "none":
                batch = {k: v.to(device) for k, v in collator(pairs[start : start + batch_size]).items()}
                rewards_chosen, rewards_rejected = batch_rewards(model, batch)
            else:
                rewards_chosen, rewards_rejected = pair_rewards(
                    model, model, pairs[start : start + batch_size], packing, max_tokens_per_batch, pad_token_id,
                    device)
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
    sections: dict[str, list[str]] | None = None, packing: str = "auto", max_tokens_per_batch: int | None = None,
) -> tuple[dict[str, Any], encode.DataStats, list[Path]]:
    """Tokenize preference rows, score them and optionally write the reward report: (metrics, stats, report files).

    The metrics carry eval_stats.pair_report's length-only baselines and intervals; per subset, macro and per
    section when the rows have a `subset` column (sections: {section: [subsets]}).
    """
    from .packing import fit_pairs_to_budget, resolve_packing

    if sections and "subset" not in dataset.column_names:
        raise ValueError(f"--sections needs a 'subset' column in the data; it has {dataset.column_names}")
    tokenized, stats = data.tokenize_pairs(dataset, tokenizer, max_length, length_policy, skip_bad_rows)
    pairs = tokenized.to_list()
    device = next(model.parameters()).device
    if ranking.is_ranking_rows(pairs):  # K-way rows: top-1, pairwise accuracy, Kendall's tau
        if packing not in ("none", "auto"):
            raise ValueError(f"--packing {packing} is not supported with K-way rows yet; use --packing none")
        metrics, written = ranking.evaluate_ranking_rows(model, tokenizer, pairs, batch_size, device, report, log)
        return metrics, stats, written
    mode = resolve_packing(packing, model)
    pairs, over_budget = fit_pairs_to_budget(pairs, mode, max_tokens_per_batch, length_policy)
    if over_budget:
        print(f"{over_budget} pairs over --max-tokens-per-batch {max_tokens_per_batch}: {length_policy}")
    chosen, rejected = rewards_for_pairs(model, pairs, pair_collator(tokenizer), batch_size, device,
                                         packing=mode, max_tokens_per_batch=max_tokens_per_batch,
                                         pad_token_id=tokenizer.pad_token_id)
    metrics = eval_metrics(chosen, rejected)
    lengths_chosen = [len(pair["chosen_ids"]) for pair in pairs]
    lengths_rejected = [len(pair["rejected_ids"]) for pair in pairs]
    subsets = [pair["subset"] for pair in pairs] if "subset" in tokenized.column_names else None
    full_chosen, full_rejected = lengths_chosen, lengths_rejected
    if stats.n_truncated:  # the length-only rules compare whole sides: cut to max_length, both would often tie
        full, _ = data.tokenize_pairs(dataset, tokenizer, None, length_policy, skip_bad_rows)  # the same rows kept
        full_chosen = [len(ids) for ids in full["chosen_ids"]]
        full_rejected = [len(ids) for ids in full["rejected_ids"]]
    metrics.update(pair_report(chosen, rejected, full_chosen, full_rejected, subsets, sections))
    written = []
    if report:
        from .plots import write_report  # matplotlib is optional

        written = write_report(report, chosen, rejected, lengths_chosen, lengths_rejected, metrics, log)
    return metrics, stats, written


@torch.no_grad()
def score_texts(model, tokenizer, items: list, max_length: int | None = None, batch_size: int = 8,
                packing: str = "auto") -> list[float]:
    """One reward per text (or chat), encoded exactly as training encoded each side (EOS included).

    Any packing mode but none scores the texts padding-free (texts share no prompt).
    """
    from . import packing as packing_module

    mode = packing_module.resolve_packing(packing, model, lambda message: None)
    device = next(model.parameters()).device
    rewards = []
    for start in range(0, len(items), batch_size):
        sides = [encode.encode_text(tokenizer, None, item) for item in items[start : start + batch_size]]
        too_long = [start + i for i, ids in enumerate(sides) if max_length and len(ids) > max_length]
        if too_long:
            raise ValueError(f"texts {too_long} are longer than max_length={max_length} tokens")
        if mode != "none":
            packed = packing_module.pack_groups([[ids] for ids in sides], tokenizer.pad_token_id, False,
                                                packing_module.is_encoder(model))
            rewards.extend(packing_module.packed_rewards(model, model, packed, device).tolist())
            continue
        input_ids, attention_mask = encode.pad_sequences(sides, tokenizer.pad_token_id, "right")
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
        rewards.extend(logits.squeeze(-1).float().tolist())
    return rewards
