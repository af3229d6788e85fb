"""Packed rows on the GPU: which attention kernel their 4D masks get, and a packed step beside a padded one.

Packing (lora_rm/packing.py) confines attention with a (rows, 1, L, L) mask. SDPA's flash kernel on CUDA takes no
mask, so a masked call goes to the memory-efficient or the cuDNN kernel where one accepts it, else to the math
kernel, which writes every head's (L x L) scores to memory (issue 22, item 4, asks which one packed rows get).
Right-padded rows carry a mask too (transformers passes one whenever a row has padding), so padded rows are the
reference, measured the same way:

1. kernels: the aten::_scaled_dot_product_* ops of one forward and backward of each layout (torch.profiler; the
   op names say the backend on CPU and CUDA alike: _flash_attention, _efficient_attention, _cudnn_attention,
   _attention_math);
2. backends: one attention call (forward + backward) with the packed mask's shape under each SDPA backend alone:
   milliseconds, or the reason the backend refuses the mask;
3. steps: padded, padding_free and shared_prompt forward + backward of the same pairs (no optimizer step: it is the
   same for every layout), timed in rotated rounds (benchmarks/paired.py), as per-round ratios to padded.

    python -m benchmarks.packed_attention --device cuda     # the 0.5B shape, 4 pairs of up to 1024 tokens, r=8
    python -m benchmarks.packed_attention --smoke           # tiny, on CPU

The pairs are random tokens laid out like HH-RLHF's: a long prompt both sides share, then two answers of
different lengths (the chosen one fills the row). gpu_check runs this as its "packed attention" section.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lora_rm import add_lora, data, packing
from lora_rm.evaluate import batch_rewards
from lora_rm.loss import bradley_terry_loss

from . import overhead, paired

LAYOUTS = ("none", "padding_free", "shared_prompt")  # lora-rm's --packing modes; "none" is padded rows
BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)
PAD = 0  # overhead.build_base's pad_token_id; the pairs' tokens are drawn above it


def synthetic_pairs(n_pairs: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Pair i: a prompt of 3/8, 4/8 or 5/8 of seq_len, a chosen answer filling the rest, a rejected one half as long."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(PAD + 1, vocab_size, (n,), generator=generator).tolist()

    pairs = []
    for i in range(n_pairs):
        prompt = tokens(seq_len * (3 + i % 3) // 8)
        answer_len = seq_len - len(prompt)
        pairs.append({"chosen_ids": prompt + tokens(answer_len),
                      "rejected_ids": prompt + tokens(max(1, answer_len // (2 + i % 2)))})
    return pairs


def layout_step(model: torch.nn.Module, pairs: list[dict], layout: str, device: str) -> None:
    """Forward and backward of the pairs laid out as train() lays them out for --packing `layout`."""
    if layout == "none":
        batch = data.to_device(data.collate_pairs(pairs, PAD), device)
        bradley_terry_loss(*batch_rewards(model, batch)).backward()
        return
    packing.packed_micro_batch(model, pairs, layout, None, PAD, device, backward=lambda loss: loss.backward(),
                               forward_context=lambda sync: contextlib.nullcontext())


def layout_tokens(pairs: list[dict], layout: str) -> int:
    """Tokens one forward computes: padded, 2 x pairs x the longest side; packed, rows x width."""
    if layout == "none":
        return 2 * len(pairs) * max(len(pair[side]) for pair in pairs for side in ("chosen_ids", "rejected_ids"))
    return packing.layout_tokens(packing.pair_groups(pairs), layout == "shared_prompt")


def attention_ops(call: Callable[[], None]) -> dict[str, int]:
    """The aten::_scaled_dot_product_* ops one call runs, with their counts: the SDPA backends it took."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        call()
    return {event.key: event.count for event in profiler.key_averages()
            if event.key.startswith("aten::_scaled_dot_product")}


def backend_name(op: str) -> str:
    """'efficient' for aten::_scaled_dot_product_efficient_attention_backward, and so on; 'math' is the slow one."""
    for name in ("flash", "efficient", "cudnn", "math", "fused"):
        if name in op:
            return name
    return op


def backend_times(allowed: torch.Tensor, heads: int, head_dim: int, dtype: torch.dtype, device: str,
                  repeats: int) -> Iterator[tuple[str, float | None, str]]:
    """(backend, median seconds of forward + backward or None, why it refused) with the packed mask's shape."""
    rows, length = allowed.shape[:2]
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(rows, heads, length, head_dim, generator=generator, device=device, dtype=dtype,
                           requires_grad=True) for _ in range(3))
    mask = allowed[:, None].to(device)
    for backend in BACKENDS:
        def call(backend: SDPBackend = backend) -> None:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

        with warnings.catch_warnings(record=True) as caught:  # a refusing backend warns why, then raises
            warnings.simplefilter("always")
            try:
                call()
            except RuntimeError as error:
                reasons = [str(w.message).split("\n")[0] for w in caught] or [str(error).split("\n")[0]]
                yield backend.name, None, "; ".join(reasons)[:200]
                continue
        yield backend.name, statistics.median(paired.seconds(call, device) for _ in range(repeats)), ""


def measure(args: argparse.Namespace, rounds: int, warmup: int, deadline: float) -> Iterator[dict]:
    """The three measurements as table rows ({"row", "value", "detail", ...numbers}), as gpu_check prints them."""
    base = overhead.build_base(args)
    config = overhead.lora_config(args, args.ranks[0], base.config.num_hidden_layers)
    model = add_lora(base, config)
    pairs = synthetic_pairs(args.pairs, args.seq_len, base.config.vocab_size, args.seed)

    def step(layout: str) -> Callable[[], None]:
        def call() -> None:
            with overhead.autocast(args):
                layout_step(model, pairs, layout, args.device)
            model.zero_grad(set_to_none=True)
        return call

    for layout in LAYOUTS:
        ops = attention_ops(step(layout))
        backends = sorted({backend_name(op) for op in ops})
        yield {"row": f"{layout} attention kernel", "value": " + ".join(backends) or "none found",
               "detail": ", ".join(f"{op.removeprefix('aten::')} x{n}" for op, n in ops.items()),
               "backends": backends, "ops": ops, "tokens": layout_tokens(pairs, layout)}

    packed = packing.pack_groups(packing.pair_groups(pairs), PAD, True, encoder=False)
    heads, dtype = base.config.num_attention_heads, next(base.parameters()).dtype
    shape = f"mask {tuple(packed.allowed.shape)}, {heads} heads, {dtype}".replace("torch.", "")
    for name, median_s, why in backend_times(packed.allowed, heads, base.config.hidden_size // heads, dtype,
                                             args.device, repeats=3):
        value = "refused" if median_s is None else f"{1000 * median_s:.3f} ms"
        yield {"row": f"SDPA {name}", "value": value, "detail": why or f"forward + backward, {shape}",
               "median_ms": None if median_s is None else 1000 * median_s}

    times = paired.timed_rounds(list(LAYOUTS), lambda layout: paired.seconds(step(layout), args.device), rounds, warmup,
                                deadline)
    for layout in LAYOUTS:
        stats = paired.spread(paired.paired(times, layout, "none"))
        median_ms = 1000 * paired.spread(times[layout])["median"]
        tokens = layout_tokens(pairs, layout)
        yield {"row": f"{layout} step", "value": f"{stats['median']:.3f}x padded",
               "detail": f"{paired.describe(stats)}; {median_ms:.1f} ms median; {tokens} tokens computed",
               "ratio": stats, "median_ms": median_ms, "tokens": tokens}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.packed_attention", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 2 pairs of 16 tokens, 2 rounds")
    parser.add_argument("--rounds", type=int, default=10)
    known, rest = parser.parse_known_args(argv)
    defaults = ["--model", "tiny", "--seq-len", "16", "--pairs", "2", "--ranks", "2"] if known.smoke else \
        ["--model", "0.5b", "--seq-len", "1024", "--pairs", "4", "--ranks", "8"]
    args = overhead.parse_args(defaults + rest)  # --device, --dtype (bf16 on CUDA), --seed ...
    args.rounds = 2 if known.smoke else known.rounds
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"| row | value | detail |  ({args.model}, {args.seq_len} tokens, {args.pairs} pairs, {args.dtype}, "
          f"{args.device})\n|---|---|---|")
    for line in measure(args, args.rounds, warmup=1, deadline=time.monotonic() + 600):
        print(f"| {line['row']} | {line['value']} | {line['detail']} |", flush=True)


if __name__ == "__main__":
    main()
