"""What a LoRA adapter costs: every configuration against the frozen-base floor, measured in one process.

    python -m benchmarks.overhead --quick
    python -m benchmarks.overhead --model small --seq-len 256 --pairs 4 --ranks 8 64
    python -m benchmarks.overhead --variant dora   # the same rows for an adapter variant, ours vs PEFT's

A train step is the same code for every configuration, only the model differs: chosen and rejected stacked
as one batch of 2 * pairs sequences, the Bradley-Terry loss -logsigmoid(r_c - r_r).mean(), backward, an AdamW
step on whatever is trainable, zero_grad(set_to_none=True). The floor is that step on a fully frozen model
that backpropagates to its input embeddings only: the least any LoRA step can cost. Configurations run
interleaved after warm-up, each round starting one configuration later (A B C, B C A, ...; paired.py), on the
same batch, so a slow moment hits all of them alike and no configuration always follows the same neighbour;
ratios to the floor are the headline, absolute times describe only this machine.

Peak memory is measured in a fresh process per configuration, so peaks do not mix: CUDA
max_memory_allocated, or on CPU the peak RSS during the steps (Linux's VmHWM, reset after the model is built).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, LlamaConfig

from lora_rm import LoraConfig, add_lora, enable_gradient_checkpointing, enable_input_require_grads, merge_lora
from lora_rm.evaluate import batch_rewards
from lora_rm.inject import lora_layers
from lora_rm.loss import bradley_terry_loss

from . import paired, report

# Llama-family models built offline from a config: (hidden, intermediate, layers, heads, vocab); any other
# --model is a hub id or a local path.
PRESETS = {
    "tiny": (64, 176, 2, 4, 256),  # the test's
    "small": (512, 1376, 4, 8, 32000),  # the CPU default
    "medium": (1024, 2816, 8, 16, 32000),  # for a GPU
    "0.5b": (896, 4864, 24, 14, 151936),  # Qwen2.5-0.5B's shape (as a Llama: all heads full, no q/k/v bias)
}
CONFIG_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REPO_ROOT = Path(__file__).resolve().parent.parent
# --variant NAME: LoraConfig kwargs for the lora-rm and peft rows (PEFT's field names, so the same for both), from
# the row's rank and the model's layer count. "loraplus" changes the optimizer instead (LORAPLUS_RATIO).
ADAPTER_VARIANTS: dict[str, Callable[[int, int], dict]] = {
    "lora": lambda rank, layers: {},
    "dora": lambda rank, layers: {"use_dora": True},
    "rank_pattern": lambda rank, layers: {  # attention at 2r (alpha 4r), the MLP at r/2
        "rank_pattern": {"q_proj": 2 * rank, "v_proj": 2 * rank, "gate_proj": max(rank // 2, 1),
                         "up_proj": max(rank // 2, 1), "down_proj": max(rank // 2, 1)},
        "alpha_pattern": {"q_proj": 4 * rank, "v_proj": 4 * rank},
    },
    "layers_to_transform": lambda rank, layers: {  # the top half of the layers only
        "layers_to_transform": list(range(layers // 2, layers)), "layers_pattern": "layers",
    },
    "pissa": lambda rank, layers: {"init_lora_weights": "pissa_niter_4"},
    "loraplus": lambda rank, layers: {},
}
LORAPLUS_RATIO = 16.0
LR = 1e-5


@dataclass(frozen=True)
class Variant:
    """One configuration: a row of the table."""

    name: str
    method: str  # floor | full | lora-rm | peft (train) ; forward | unmerged | merged (inference)
    rank: int | None = None
    checkpointing: bool = False

    @property
    def trains(self) -> bool:
        return self.method in ("floor", "full", "lora-rm", "peft")


def variants(ranks: list[int], with_peft: bool) -> list[Variant]:
    """All configurations, in table order; each train step with and without gradient checkpointing."""
    rows = [Variant("forward", "forward")]
    for ckpt in (False, True):
        suffix = "+ckpt" if ckpt else ""
        rows += [Variant(f"floor{suffix}", "floor", checkpointing=ckpt), Variant(f"full{suffix}", "full", None, ckpt)]
        for r in ranks:
            rows.append(Variant(f"lora-rm r={r}{suffix}", "lora-rm", r, ckpt))
            if with_peft:
                rows.append(Variant(f"peft r={r}{suffix}", "peft", r, ckpt))
    for r in ranks:
        rows += [Variant(f"forward unmerged r={r}", "unmerged", r), Variant(f"forward merged r={r}", "merged", r)]
    return rows


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- models


def build_base(args: argparse.Namespace) -> torch.nn.Module:
    """The seeded base *ForSequenceClassification model (num_labels=1), in training mode."""
    torch.manual_seed(args.seed)
    if args.model in PRESETS:
        config = LlamaConfig(**dict(zip(CONFIG_FIELDS, PRESETS[args.model], strict=True)), num_labels=1, pad_token_id=0)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        config = AutoConfig.from_pretrained(args.model, num_labels=1)
        model = AutoModelForSequenceClassification.from_pretrained(args.model, config=config)
        if model.config.pad_token_id is None:  # HF picks the last non-pad token; our batch has no padding
            model.config.pad_token_id = 0
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    return model.to(device=args.device, dtype=dtype).train()


def lora_config(args: argparse.Namespace, rank: int, layers: int) -> LoraConfig:
    targets = args.targets or (LLAMA_TARGETS if args.model in PRESETS else "all-linear")
    kwargs = ADAPTER_VARIANTS[args.variant](rank, layers)
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, **kwargs)


def build(variant: Variant, base: torch.nn.Module, args: argparse.Namespace):
    """(model, optimizer or None) for a configuration; base is copied, never changed."""
    model = copy.deepcopy(base)
    if variant.method in ("forward", "floor"):
        model.requires_grad_(False)
    elif variant.method in ("lora-rm", "unmerged", "merged"):
        model = add_lora(model, lora_config(args, variant.rank, base.config.num_hidden_layers))
        if variant.method == "merged":
            model = merge_lora(model)
    elif variant.method == "peft":
        import peft

        config = lora_config(args, variant.rank, base.config.num_hidden_layers)
        peft_config = peft.LoraConfig(
            task_type="SEQ_CLS", r=config.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules,
            **ADAPTER_VARIANTS[args.variant](variant.rank, base.config.num_hidden_layers),
        )
        model = peft.get_peft_model(model, peft_config)
    if variant.method == "floor":
        enable_input_require_grads(model)  # backward reaches the input embeddings, no weight gets a gradient
    if variant.checkpointing:
        hf_model = model.get_base_model() if variant.method == "peft" else model
        enable_gradient_checkpointing(hf_model)
    model.train(variant.trains)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR) if variant.trains and trainable else None
    if args.variant == "loraplus" and variant.method in ("lora-rm", "peft"):
        optimizer = loraplus_optimizer(model, variant.method)
    return model, optimizer


def loraplus_optimizer(model: torch.nn.Module, method: str) -> torch.optim.Optimizer:
    """LoRA+ groups (B at LORAPLUS_RATIO x lr): lora-rm's build_optimizer, or PEFT's create_loraplus_optimizer."""
    if method == "peft":
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=LORAPLUS_RATIO)
    from lora_rm.config import TrainConfig
    from lora_rm.optim import build_optimizer

    return build_optimizer(model, TrainConfig(lr=LR, loraplus_lr_ratio=LORAPLUS_RATIO, weight_decay=0.0))


def make_batch(args: argparse.Namespace, vocab_size: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, no padding; the same tensors feed every configuration."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    input_ids = torch.randint(1, vocab_size, (2 * args.pairs, args.seq_len), generator=generator)
    return {"input_ids": input_ids.to(args.device), "attention_mask": torch.ones_like(input_ids).to(args.device)}


# ------------------------------------------------------------------------------------------------ step


def train_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer | None) -> None:
    """One Bradley-Terry step; identical for every configuration (the floor has nothing to update)."""
    chosen, rejected = batch_rewards(model, batch)  # the trainer's own forward and loss
    bradley_terry_loss(chosen, rejected).backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@torch.inference_mode()
def forward_step(model: torch.nn.Module, batch: dict, optimizer: None = None) -> None:
    model(**batch)


def autocast(args: argparse.Namespace):
    """bf16 autocast on CUDA (with a bf16 base and PEFT-style fp32 adapters); nothing on fp32."""
    device_type = torch.device(args.device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")


def timed(step, model, optimizer, batch, args: argparse.Namespace) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step; CUDA events after a synchronisation on GPU (CPU: nan)."""
    def call() -> None:
        with autocast(args):
            step(model, batch, optimizer)

    cpu = time.process_time()
    wall = paired.seconds(call, args.device)
    return wall, float("nan") if torch.device(args.device).type == "cuda" else time.process_time() - cpu


# -------------------------------------------------------------------------------------------- measures


def lora_flop_fraction(model: torch.nn.Module, tokens: int) -> dict[str, float]:
    """FLOP theory: r(d_in + d_out) / (d_in d_out) added to each adapted layer's forward. Against the floor (whose
    backward computes only the input gradient) PEFT's step adds 1.5x that: four small matmuls in backward. lora-rm's
    folded step (lora.py) adds 1.0x that plus r / tokens: two of the six small matmuls become two r x d_in x d_out
    products."""
    shapes = [(layer.lora_A.in_features, layer.lora_B.out_features, layer.lora_A.out_features) for _, layer in
              lora_layers(model)]
    fractions = [r * (d_in + d_out) / (d_in * d_out) for d_in, d_out, r in shapes]
    base_flops = sum(d_in * d_out for d_in, d_out, _ in shapes)
    overall = sum(r * (d_in + d_out) for d_in, d_out, r in shapes) / base_flops
    folded = sum(r * d_in * d_out / tokens for d_in, d_out, r in shapes) / base_flops
    return {"layer_min": min(fractions), "layer_max": max(fractions), "adapted_forward": overall,
            "adapted_step": 1.5 * overall, "adapted_step_folded": overall + folded}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    if optimizer is None:
        return 0
    tensors = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _proc_status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, from Linux's /proc."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def measure_memory_here(variant: Variant, args: argparse.Namespace) -> dict[str, float]:
    """Peak memory of this one configuration's steps; measure_memory runs it in a process of its own."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, optimizer = build(variant, build_base(args), args)
    batch = make_batch(args, model.config.vocab_size)
    step = train_step if variant.trains else forward_step
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _proc_status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset VmHWM to the current RSS: the peak below is the steps', not the build's
    for _ in range(2):  # the optimizer state appears in the first step; the second sees it all
        with autocast(args):
            step(model, batch, optimizer)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _proc_status_bytes("VmHWM")
    return {"peak_mib": peak / 2**20, "step_mib": (peak - before) / 2**20}


def measure_memory(variant: Variant, args: argparse.Namespace) -> dict[str, float]:
    """measure_memory_here in a fresh process, so peaks do not mix: forked on CPU (call this before building
    anything, so every child starts from the same process), spawned on CUDA, which cannot be forked."""
    method = "spawn" if torch.device(args.device).type == "cuda" else "fork"
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context(method)) as pool:
        return pool.submit(measure_memory_here, variant, args).result()


# ---------------------------------------------------------------------------------------------- driver


def run(args: argparse.Namespace) -> dict:
    """Measure each configuration's memory in a process of its own, then time them all interleaved here."""
    rows = variants(args.ranks, with_peft=peft_available() and not args.no_peft)
    memory = {v.name: {} if args.no_memory else measure_memory(v, args) for v in rows}
    base = build_base(args)
    built = {v.name: build(v, base, args) for v in rows}
    batch = make_batch(args, base.config.vocab_size)
    steps = {v.name: train_step if v.trains else forward_step for v in rows}
    names = [v.name for v in rows]
    for k in range(args.warmup):
        for name in paired.rotation(names, k):
            timed(steps[name], *built[name], batch, args)
    wall = {v.name: [] for v in rows}
    cpu = {v.name: [] for v in rows}
    for k in range(args.repeats):  # interleaved and rotated (paired.py): A B C, B C A, C A B, ...
        for name in paired.rotation(names, k):
            w, c = timed(steps[name], *built[name], batch, args)
            wall[name].append(w)
            cpu[name].append(c)
    tokens = 2 * args.pairs * args.seq_len
    results = []
    for v in rows:
        model, optimizer = built[v.name]
        trainable = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)
        row = {**asdict(v), "trains": v.trains, "median_s": statistics.median(wall[v.name]), "min_s": min(wall[v.name]),
               "cpu_median_s": statistics.median(cpu[v.name]), "times_s": wall[v.name],
               "tokens_per_s": tokens / statistics.median(wall[v.name]),
               "trainable_params": trainable if v.trains else 0,
               "optimizer_state_bytes": optimizer_state_bytes(optimizer), **memory[v.name]}
        if v.method in ("lora-rm", "unmerged"):
            row["flop_fraction"] = lora_flop_fraction(model, tokens)
        results.append(row)
    return {"setup": setup(args, base), "rows": results}


def setup(args: argparse.Namespace, base: torch.nn.Module) -> dict:
    """What was measured and where: the table means nothing without it."""
    device = torch.device(args.device)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "model": args.model, "config": {k: getattr(base.config, k, None) for k in CONFIG_FIELDS},
        "seq_len": args.seq_len, "pairs": args.pairs, "tokens_per_step": 2 * args.pairs * args.seq_len,
        "ranks": args.ranks, "dtype": args.dtype,
        "targets": lora_config(args, args.ranks[0], base.config.num_hidden_layers).target_modules,
        "variant": args.variant,
        "device": args.device, "hardware": hardware, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(), "repeats": args.repeats, "warmup": args.warmup,
        "torch": torch.__version__, "python": platform.python_version(), "peft": _peft_version(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def _peft_version() -> str | None:
    return __import__("peft").__version__ if peft_available() else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small", help=f"a preset ({', '.join(PRESETS)}), a hub id or a local path")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per step (2x sequences)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--variant", choices=list(ADAPTER_VARIANTS), default="lora",
                        help="adapter variant of the lora-rm and peft rows (ADAPTER_VARIANTS)")
    parser.add_argument("--targets", nargs="+", default=None, help="LoRA targets; default all seven Llama projections")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT even when it is installed")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory processes")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "overhead"),
                        help="writes OUT.json and OUT.png")
    parser.add_argument("--quick", action="store_true", help="small model, 128 tokens, 2 pairs, r=8, 5 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_len, args.pairs, args.ranks, args.repeats = 128, 2, [8], 5
    if args.dtype is None:
        args.dtype = "bf16" if torch.device(args.device).type == "cuda" else "fp32"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    print(report.markdown(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    report.plot(results, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
