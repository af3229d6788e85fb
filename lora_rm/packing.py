"""Packed forwards: no padding, and a pair's shared prompt computed once; rewards equal the padded path's.

A padded batch of 2B rows computes every row up to the longest one. Packing puts sequences end to end in
rows as wide as the longest item (first-fit, longest first) and confines attention with a 4D mask (R, 1, L, L),
so attention stays as cheap as in padded rows while the padding and the repeated prompts go:

  padding_free   each sequence attends only to itself (causal for decoders, bidirectional for encoders);
                 its position ids restart at 0.
  shared_prompt  (causal decoders) a group of n >= 2 sequences that start with the same tokens (a pair's
                 prompt) is laid out as [prompt][branch 1]...[branch n]. The prompt is computed once; every
                 branch attends to the prompt and causally to itself, never to another branch, and its
                 position ids continue where the prompt ends. A branch's tokens then see exactly what they
                 see in their own padded row, so hidden states and rewards are the same numbers.

The reward is read where the padded path reads it: a decoder's head at the rightmost token whose id is not
pad_token_id (pad == EOS: the token before the trailing EOS), an encoder's pooler at the first token. A forward
hook on the head (decoders) or a pre-hook on the pooler (BERT) takes those positions, so the forward still runs
through the model (and its DDP/FSDP wrapper, gradient checkpointing and autocast) unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import data, distributed
from .config import PACKING_MODES
from .loss import bradley_terry_loss


def is_encoder(model: nn.Module) -> bool:
    """True for BERT-style models whose head reads the first token through a pooler (bidirectional attention)."""
    return getattr(model.base_model, "pooler", None) is not None


# Architectures whose packed rewards and gradients tests/test_packing.py checks against the padded path.
PACKING_TESTED = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox", "opt", "bert")


def resolve_packing(mode: str, model: nn.Module, log: Callable[[str], Any] = print, k_way_rows: bool = False,
                    reentrant_under_torchrun: bool = False, max_tokens_per_batch: int | None = None) -> str:
    """The mode to run, the whole decision in one place. auto (the default) is the fastest exact mode:
    shared_prompt for a tested decoder, padding_free for a tested encoder, none for anything else (said in the
    log). An encoder asked for shared_prompt falls back to padding_free (its attention is bidirectional: a prompt
    cannot be shared). K-way rows, and reentrant checkpointing under torchrun, run padded rows: auto says so, an
    explicit packed mode is refused. A token budget on padded rows is refused: it would bound nothing."""
    resolved = packing_for_model(mode, model, log)
    unsupported = {"K-way rows": k_way_rows,  # not wired to them yet
                   # gives other gradients than one process (DDP's static_graph; one process is exact): not found yet
                   "reentrant checkpointing under torchrun": reentrant_under_torchrun}
    reason = next((reason for reason, holds in unsupported.items() if holds and resolved != "none"), None)
    if reason and mode != "auto":
        raise ValueError(f"--packing {mode} is not supported with {reason} yet; use --packing none")
    if reason:
        log(f"packing auto: {reason}; using --packing none (padded rows)")
        resolved = "none"
    if resolved == "none" and max_tokens_per_batch is not None:
        why = reason or ("as asked" if mode == "none" else "see the 'packing auto' line")
        raise ValueError(
            f"--max-tokens-per-batch {max_tokens_per_batch} bounds packed forwards only, and --packing {mode} runs "
            f"padded rows here ({why}): a padded micro-batch holds --batch-size rows whatever their length; unset "
            "--max-tokens-per-batch and lower --batch-size to bound a forward"
        )
    return resolved


def packing_for_model(mode: str, model: nn.Module, log: Callable[[str], Any]) -> str:
    """resolve_packing's answer from the model alone."""
    if mode not in PACKING_MODES:
        raise ValueError(f"packing must be one of {PACKING_MODES}, got {mode!r}")
    if mode == "none":
        return mode
    problem = unpackable_reason(model)
    if mode == "auto":
        model_type = getattr(model.config, "model_type", None)
        if problem is None and model_type not in PACKING_TESTED:
            problem = f"packing is tested on {', '.join(PACKING_TESTED)}, not on {model_type!r}"
        if problem:
            log(f"packing auto: {problem}; using --packing none (padded rows)")
            return "none"
        return "padding_free" if is_encoder(model) else "shared_prompt"
    if problem:
        raise ValueError(f"{problem}: pass --packing none")
    if is_encoder(model) and mode == "shared_prompt":
        log(f"packing: {type(model).__name__} is an encoder (bidirectional attention): the prompt cannot be shared "
            "between chosen and rejected; using padding_free")
        return "padding_free"
    return mode


def unpackable_reason(model: nn.Module) -> str | None:
    """Why the model's head or attention cannot take a packed row, or None when it can."""
    implementation = getattr(model.config, "_attn_implementation", "eager")
    if implementation not in ("sdpa", "eager"):
        return f"packing needs sdpa or eager attention (a 4D mask); the model uses {implementation!r}"
    if not is_encoder(model) and not isinstance(getattr(model, "score", None), nn.Module):
        return (f"packing supports decoders with a `score` head and BERT-style encoders with a pooler; "
                f"{type(model).__name__} is neither")
    return None


@dataclass
class Packed:
    """Packed rows: input_ids and position_ids (R, L), which key each query may attend to (R, L, L), and where
    each sequence's reward is read (row, column)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    read_row: torch.Tensor  # (N,)
    read_column: torch.Tensor  # (N,)

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """The longest common token prefix of the group (ids, not text: a token that joins the prompt's last word
    to the response differs between the sides and so belongs to the branches, never to the shared prompt)."""
    length = 0
    for tokens in zip(*sequences, strict=False):
        if any(token != tokens[0] for token in tokens):
            break
        length += 1
    return length


def read_position(sequence: list[int], pad_token_id: int | None, encoder: bool) -> int:
    """Where the padded path reads a sequence's reward: the first token (encoder) or the rightmost non-pad
    token (decoder; 0 when every token is pad, as transformers' argmax gives)."""
    if encoder or pad_token_id is None:
        return 0 if encoder else len(sequence) - 1
    for index in range(len(sequence) - 1, -1, -1):
        if sequence[index] != pad_token_id:
            return index
    return 0


def group_tokens(group: list[list[int]], share_prompt: bool) -> int:
    """Tokens a group costs packed: the sum of its sequences, less the shared prompt's repeats."""
    shared = shared_prefix_length(group) if share_prompt and len(group) > 1 else 0
    return sum(len(sequence) for sequence in group) - (len(group) - 1) * shared


@dataclass
class Item:
    """Tokens that must share a row: one sequence, or a shared prompt and its branches (segment -1: no parent)."""

    ids: list[int]
    positions: list[int]
    segments: list[int]  # local segment number of each token
    parents: list[int]  # parent segment of each local segment, -1 when none


def group_items(group: list[list[int]], pad_token_id: int | None, share_prompt: bool,
                encoder: bool) -> tuple[list[Item], list[tuple[int, int]]]:
    """A group's items and, per sequence, (item number within the group, column within the item) of its reward."""
    shared = shared_prefix_length(group) if share_prompt and not encoder and len(group) > 1 else 0
    if not shared:
        items = [Item(list(seq), list(range(len(seq))), [0] * len(seq), [-1]) for seq in group]
        return items, [(k, read_position(seq, pad_token_id, encoder)) for k, seq in enumerate(group)]
    item = Item(list(group[0][:shared]), list(range(shared)), [0] * shared, [-1])
    reads = []
    for k, sequence in enumerate(group, start=1):
        branch_start = len(item.ids)
        item.ids += sequence[shared:]
        item.positions += range(shared, len(sequence))
        item.segments += [k] * (len(sequence) - shared)
        item.parents.append(0)
        where = read_position(sequence, pad_token_id, encoder)
        reads.append((0, where if where < shared else branch_start + where - shared))
    return [item], reads


def first_fit(lengths: list[int]) -> tuple[list[list[int]], int]:
    """Items (by length) placed first-fit, longest first, into rows as wide as the longest: (rows of item numbers,
    width)."""
    width = max(lengths)
    rows: list[list[int]] = []
    used: list[int] = []
    for number in sorted(range(len(lengths)), key=lambda n: -lengths[n]):
        row = next((r for r in range(len(rows)) if used[r] + lengths[number] <= width), None)
        if row is None:
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append(number)
        used[row] += lengths[number]
    return rows, width


def item_lengths(group: list[list[int]], share_prompt: bool) -> list[int]:
    """Lengths of the items group_items makes of a group (one shared tree, or one item per sequence)."""
    if share_prompt and len(group) > 1 and shared_prefix_length(group):
        return [group_tokens(group, True)]
    return [len(sequence) for sequence in group]


def layout_tokens(groups: list[list[list[int]]], share_prompt: bool) -> int:
    """Tokens one packed forward of these groups computes, row padding included (rows x width)."""
    rows, width = first_fit([n for group in groups for n in item_lengths(group, share_prompt)])
    return len(rows) * width


def pack_groups(groups: list[list[list[int]]], pad_token_id: int | None, share_prompt: bool,
                encoder: bool) -> Packed:
    """Pack groups of sequences into rows; rewards come back in group order, then sequence order within a group.

    share_prompt: each group's longest common prefix is laid out once, its sequences as branches after it (decoders
    only); otherwise every sequence is its own item. Items are placed first-fit, longest first, into rows as long
    as the longest item, so a packed micro-batch never computes more tokens than the padded one; the rows' ends
    are padded with tokens that attend only to themselves (finite, never read, never attended to).
    """
    items, reads = [], []
    for group in groups:
        group_items_, group_reads = group_items(group, pad_token_id, share_prompt, encoder)
        reads += [(len(items) + k, column) for k, column in group_reads]
        items += group_items_
    rows, width = first_fit([len(item.ids) for item in items])
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_token_id if pad_token_id is not None else 0, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    segment = torch.full((n_rows, width), -1, dtype=torch.long)
    parent = torch.full((n_rows, width), -2, dtype=torch.long)  # -2 matches no segment, pad included
    where: dict[int, tuple[int, int]] = {}  # item number -> (row, first column)
    n_segments = 0
    for row, numbers in enumerate(rows):
        column = 0
        for number in numbers:
            item = items[number]
            end = column + len(item.ids)
            local = torch.tensor(item.segments)
            parents = torch.tensor(item.parents)[local]
            input_ids[row, column:end] = torch.tensor(item.ids)
            position_ids[row, column:end] = torch.tensor(item.positions)
            segment[row, column:end] = local + n_segments
            parent[row, column:end] = torch.where(parents >= 0, parents + n_segments, -2)
            where[number] = (row, column)
            n_segments += len(item.parents)
            column = end
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)
    allowed = same | (parent[:, :, None] == segment[:, None, :]) | torch.eye(width, dtype=torch.bool)
    if not encoder:
        allowed &= torch.ones(width, width, dtype=torch.bool).tril()
    read_row = torch.tensor([where[number][0] for number, _ in reads])
    read_column = torch.tensor([where[number][1] + column for number, column in reads])
    return Packed(input_ids, position_ids, allowed, read_row, read_column)


def attention_mask_4d(allowed: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The (R, 1, L, L) mask the model's attention takes as is: bool for sdpa, additive for eager."""
    if model.config._attn_implementation == "sdpa":
        return allowed[:, None]
    dtype = model.get_input_embeddings().weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


@contextlib.contextmanager
def reading_at(model: nn.Module, rows: torch.Tensor, columns: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
    """Hooks that make the model's head read at (rows, columns); decoder rewards land in the yielded dict."""
    found: dict[str, torch.Tensor] = {}
    if is_encoder(model):  # the pooler reads hidden[:, 0]: give it each sequence's first token as its own row
        def pick_first_tokens(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            return (hidden[rows, columns].unsqueeze(1), *args[1:]), kwargs

        handle = model.base_model.pooler.register_forward_pre_hook(pick_first_tokens, with_kwargs=True)
    else:  # the head runs on every position (R, L, 1): keep the positions the padded path would read
        def keep_read_positions(module, args, output):
            found["rewards"] = output[rows, columns].squeeze(-1)

        handle = model.score.register_forward_hook(keep_read_positions)
    try:
        yield found
    finally:
        handle.remove()


def packed_rewards(forward_model: nn.Module, packed: Packed, device) -> torch.Tensor:
    """One forward of packed rows through forward_model (the model, maybe DDP/FSDP-wrapped): (N,) rewards."""
    model = distributed.unwrapped(forward_model)  # hooks go on the plain module
    encoder = is_encoder(model)
    packed = Packed(**data.to_device(vars(packed), device))  # pinned, without waiting for the GPU
    kwargs = dict(input_ids=packed.input_ids, position_ids=packed.position_ids,
                  attention_mask=attention_mask_4d(packed.allowed, model))
    if encoder:  # BERT's buffered token type ids stop at max_position_embeddings; a packed row may be longer
        kwargs["token_type_ids"] = torch.zeros_like(packed.input_ids)
    else:
        kwargs["use_cache"] = False
    with reading_at(model, packed.read_row, packed.read_column) as found:
        logits = forward_model(**kwargs).logits
    rewards = logits.squeeze(-1) if encoder else found["rewards"]
    return rewards if rewards.dtype == torch.float64 else rewards.float()  # fp32 as batch_rewards; fp64 kept


def pair_groups(pairs: list[dict[str, Any]]) -> list[list[list[int]]]:
    """Each pair as a group of two sequences, chosen first."""
    return [[pair["chosen_ids"], pair["rejected_ids"]] for pair in pairs]


def chunks_within_budget(groups: list[list[list[int]]], budget: int | None, share_prompt: bool) -> list[list[int]]:
    """Consecutive groups split into runs whose packed rows hold at most `budget` tokens, padding included (None:
    one run); a group over the budget on its own is an error (fit_pairs_to_budget drops or cuts such pairs first)."""
    if budget is None:
        return [list(range(len(groups)))]
    runs: list[list[int]] = []
    for index, group in enumerate(groups):
        if layout_tokens([group], share_prompt) > budget:
            raise ValueError(f"a pair packs to {layout_tokens([group], share_prompt)} tokens, over "
                             f"--max-tokens-per-batch {budget}")
        if runs and layout_tokens([groups[i] for i in runs[-1]] + [group], share_prompt) <= budget:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def pair_rewards(forward_model: nn.Module, pairs: list[dict[str, Any]], mode: str,
                 budget: int | None, pad_token_id: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards of the pairs, one packed forward per run of at most `budget` tokens (no grad)."""
    chosen, rejected = [], []
    for rewards in _pair_reward_runs(forward_model, pairs, mode, budget, pad_token_id, device):
        chosen.append(rewards[:, 0])
        rejected.append(rewards[:, 1])
    return torch.cat(chosen), torch.cat(rejected)


def _pair_reward_runs(forward_model, pairs, mode, budget, pad_token_id, device) -> Iterator[torch.Tensor]:
    """(pairs in the run, 2) rewards, one run at a time: the caller may backward each before the next."""
    groups = pair_groups(pairs)
    share = mode == "shared_prompt"
    encoder = is_encoder(distributed.unwrapped(forward_model))
    for run in chunks_within_budget(groups, budget, share):
        packed = pack_groups([groups[i] for i in run], pad_token_id, share, encoder)
        yield packed_rewards(forward_model, packed, device).view(len(run), 2)


def packed_micro_batch(forward_model: nn.Module, pairs: list[dict[str, Any]], mode: str,
                       budget: int | None, pad_token_id: int | None, device, backward: Callable[[torch.Tensor], Any],
                       forward_context: Callable[[bool], Any], sync: bool = True,
                       center_rewards_coefficient: float | None = None, loss_fn: Callable = bradley_terry_loss,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of a micro-batch of pairs with a backward per packed run: (loss, rewards_chosen, rewards_rejected).

    The Bradley-Terry loss is a mean over pairs, so a run's share is its pairs' loss x (pairs in run / pairs):
    the summed gradients equal the whole micro-batch's, and only one run's activations are alive at a time.
    forward_context(sync) wraps each run's forward (DDP's no_sync, autocast); only the last run of a syncing
    micro-batch syncs.
    """
    margins = None
    if "margin" in pairs[0]:  # one copy for the micro-batch; each run takes its slice (runs are consecutive pairs)
        margins = data.to_device({"margin": torch.tensor([float(pair["margin"]) for pair in pairs])}, device)["margin"]
    chosen, rejected, total = [], [], torch.zeros((), dtype=torch.float64, device=device)
    runs = chunks_within_budget(pair_groups(pairs), budget, mode == "shared_prompt")
    rewards_by_run = _pair_reward_runs(forward_model, pairs, mode, budget, pad_token_id, device)
    for number, run in enumerate(runs):
        with forward_context(sync and number == len(runs) - 1):
            rewards = next(rewards_by_run)
        margin = margins[run[0] : run[-1] + 1] if margins is not None else None
        loss = loss_fn(rewards[:, 0], rewards[:, 1], margin, center_rewards_coefficient)
        backward(loss * (len(run) / len(pairs)))
        total += loss.detach().double() * len(run) / len(pairs)  # on the device: no read-back per run
        chosen.append(rewards[:, 0].detach())
        rejected.append(rewards[:, 1].detach())
    return total.float(), torch.cat(chosen), torch.cat(rejected)


def fit_pairs_to_budget(pairs: list[dict[str, Any]], mode: str, budget: int | None,
                        length_policy: str) -> tuple[list[dict[str, Any]], int]:
    """Pairs that pack within the budget: over it, dropped (drop) or cut from the left (truncate_left) until
    they fit; returns (pairs, how many were dropped or cut)."""
    if budget is None or mode == "none":
        return pairs, 0
    share = mode == "shared_prompt"
    kept, changed = [], 0
    for pair in pairs:
        group = [pair["chosen_ids"], pair["rejected_ids"]]
        if layout_tokens([group], share) <= budget:
            kept.append(pair)
            continue
        changed += 1
        if length_policy == "truncate_left":
            keep = budget // 2
            chosen, rejected = pair["chosen_ids"][-keep:], pair["rejected_ids"][-keep:]
            kept.append({**pair, "chosen_ids": chosen, "rejected_ids": rejected,
                         "length": max(len(chosen), len(rejected))})
    return kept, changed
