"""--fsdp without the whole model on any host: build on the meta device, shard, then read each rank's pieces.

from_pretrained on every rank would hold a full copy per process before fully_shard cuts it. Instead the model
is built with its parameters on the meta device (no memory; buffers such as rotary tables stay real: they are
computed at construction, not saved), LoRA goes in and FSDP shards it as usual, `to_empty` allocates only the
local shards, and the pretrained model's safetensors tensors are read one at a time, each rank reading from disk
only the rows of its FSDP shard (safetensors' get_slice).

What the pretrained files lack is drawn as the one-process path draws it, from the global RNG in the same order
(train() seeds it identically on every rank): the score head first (from_pretrained's normal(0,
initializer_range) in the base dtype), then each LoRA layer's A and B through lora.new_lora_pair, as LoRALinear
draws them. So --fsdp starts from the very weights one process starts from.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor

from . import distributed
from .config import BUILTIN, TrainConfig
from .inject import head_modules, lora_config_of, lora_layers
from .lora import new_lora_pair
from .model_io import ensure_pad_token, load_tokenizer, torch_dtype


def applies(config: TrainConfig) -> bool:
    """Only a real sharding of a checkpoint: the builtin model and 4-bit loading keep from_pretrained."""
    return config.fsdp and distributed.is_distributed() and config.model != BUILTIN and not config.load_in_4bit


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter created inside goes to the meta device; buffers stay real (no checkpoint holds them)."""
    register_parameter = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(module, name, param)
        if param is not None:  # allocated but never touched, so it costs no memory before it is dropped
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter


def empty_model_and_tokenizer(name: str, trust_remote_code: bool = False, base_dtype: str = "fp32"):
    """load_model_and_tokenizer's pair, but nothing read: the parameters are on the meta device (buffers real)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tokenizer = load_tokenizer(name, trust_remote_code)
    model_config = AutoConfig.from_pretrained(name, num_labels=1, trust_remote_code=trust_remote_code)
    with parameters_on_meta():
        model = AutoModelForSequenceClassification.from_config(
            model_config, dtype=torch_dtype(base_dtype), trust_remote_code=trust_remote_code
        )
    message = ensure_pad_token(tokenizer, model)
    if message:
        distributed.print_main(message)
    return model, tokenizer


def is_empty(model: nn.Module) -> bool:
    """True while some parameter is still on the meta device (built by empty_model_and_tokenizer, not yet filled)."""
    return any(param.is_meta for param in model.parameters())


def pretrained_files(name: str) -> list[Path]:
    """The pretrained model's safetensors files, of a local folder or a Hub id (downloaded); .bin only is refused."""
    folder = Path(name)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, allow_patterns=["*.safetensors", "*.json"]))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / file for file in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    raise ValueError(
        f"{name}: no model.safetensors or model.safetensors.index.json"
        + (f" (only {', '.join(pickles)}: lora-rm never unpickles; convert them to safetensors)" if pickles else "")
    )


def pretrained_key(model_key: str) -> str:
    """The pretrained files' name of a model weight: LoRA wraps a layer's weight as ...q_proj.base_layer.weight."""
    return model_key.replace(".base_layer.", ".")


@torch.no_grad()
def load_shards(model: nn.Module, name: str, device: torch.device, base_dtype: str = "fp32") -> None:
    """Allocate this rank's shards of a model sharded on the meta device and fill them, one pretrained tensor at a time.

    Weights the pretrained files have are read (lm_head and other extra keys are ignored); the head, if missing,
    and the adapter are drawn as in one process (module docstring). A parameter left without a value raises.
    """
    keys_by_file = pretrained_keys_by_file(pretrained_files(name))
    in_pretrained = {key for keys in keys_by_file.values() for key in keys}
    sources = plan_sources(model, in_pretrained)
    lora = lora_config_of(model)
    heads = head_modules(model, lora.modules_to_save)
    drawn = drawn_names(model, heads)
    refuse_weights_without_source(model, name, sources, in_pretrained, drawn)
    allocate_shards(model, device)
    filled = fill_from_files(model, name, keys_by_file, sources, device)
    draw_missing_head(heads, filled, model.config.get_text_config().initializer_range, torch_dtype(base_dtype))
    draw_adapter(model, lora.init_lora_weights)
    refuse_empty_parameters(model, name, filled, drawn)


def pretrained_keys_by_file(files: list[Path]) -> dict[Path, list[str]]:
    """The tensor names each safetensors file holds, read from its header alone."""
    keys_by_file = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            keys_by_file[file] = list(handle.keys())
    return keys_by_file


def plan_sources(model: nn.Module, in_pretrained: set[str]) -> dict[str, str]:
    """Model key -> the pretrained key that fills it; a base model's files lack the head's prefix (model.)."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    sources = {}
    for key in model.state_dict(keep_vars=True):
        wanted = pretrained_key(key)
        if wanted not in in_pretrained and wanted.removeprefix(prefix) in in_pretrained:
            wanted = wanted.removeprefix(prefix)
        sources[key] = wanted
    return sources


def refuse_weights_without_source(
    model: nn.Module, name: str, sources: dict[str, str], in_pretrained: set[str], drawn: set[str]
) -> None:
    """Before any memory is allocated: every parameter is read from the files or drawn, under one of its names."""
    aliases: dict[int, list[str]] = {}  # tied weights: one parameter, several names
    for key, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(key)
    unknown = [names[0] for names in aliases.values()
               if not any(sources[key] in in_pretrained or key in drawn for key in names)]  # fmt: skip
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 3 else "")
        raise ValueError(
            f"{name}: the checkpoint has no weight named {shown}. --fsdp reads the files by the model's own names, "
            "without the renaming or fusing from_pretrained does for some checkpoints (older names, fused qkv or "
            "expert weights): load it once with from_pretrained and save_pretrained it to a folder to use here, "
            "or train without --fsdp"
        )


def allocate_shards(model: nn.Module, device: torch.device) -> None:
    """Real memory for this rank's shards only; the buffers (rotary tables), computed at construction, are kept."""
    buffers = {key: buffer.clone() for key, buffer in model.named_buffers(remove_duplicate=False)}
    model.to_empty(device=device)  # buffers come back empty too
    for key, buffer in buffers.items():
        model.get_buffer(key).copy_(buffer)


def fill_from_files(
    model: nn.Module, name: str, keys_by_file: dict[Path, list[str]], sources: dict[str, str], device: torch.device
) -> set[int]:
    """Copy each pretrained tensor the model wants into this rank's shard; returns the ids of the filled parameters."""
    targets: dict[str, list[str]] = {}  # pretrained key -> model keys
    for key, wanted in sources.items():
        targets.setdefault(wanted, []).append(key)
    state = model.state_dict(keep_vars=True)  # after to_empty: FSDP may have replaced the parameter objects
    filled = set()
    for file, keys in keys_by_file.items():
        for key in keys:
            if key not in targets:
                continue
            # Open per tensor: a handle maps the file, and every page read stays resident until it is closed.
            with safe_open(file, framework="pt") as handle:
                stored = handle.get_slice(key)
                for model_key in targets[key]:
                    target = state[model_key]
                    if tuple(stored.get_shape()) != tuple(target.shape):
                        shapes = f"{tuple(stored.get_shape())}, the model wants {tuple(target.shape)}"
                        raise ValueError(f"{name}: {key} has shape {shapes}")
                    if id(target) not in filled:
                        copy_local_rows(stored, target, device)
                        filled.add(id(target))
    return filled


def copy_local_rows(stored, target: torch.Tensor, device: torch.device) -> None:
    """Read from disk only the rows of a pretrained tensor this rank holds (its FSDP shard) and copy them in."""
    rows = distributed.local_rows(target)
    if rows is None or not stored.get_shape():  # another sharding, or a 0-dim tensor: read it whole
        full = stored[...].to(device, target.dtype)
        target.copy_(distributed.shard_like(full, target))
        return
    local = target.to_local() if isinstance(target, DTensor) else target
    local.copy_(stored[rows].to(device, target.dtype))


def refuse_empty_parameters(model: nn.Module, name: str, filled: set[int], drawn: set[str]) -> None:
    """After filling and drawing: no parameter may be left holding to_empty's uninitialised memory."""
    empty = [key for key, param in model.named_parameters(remove_duplicate=False)
             if id(param) not in filled and key not in drawn]  # fmt: skip
    if empty:
        raise ValueError(f"{name}: no value for {', '.join(empty)}; not training on empty memory")


def drawn_names(model: nn.Module, heads: dict[str, nn.Module]) -> set[str]:
    """Names of the parameters drawn rather than read when missing: the head and the adapter."""
    drawn = {f"{head_name}.{key}" for head_name, head in heads.items() for key, _ in head.named_parameters()}
    for layer_name, _ in lora_layers(model):
        drawn |= {f"{layer_name}.lora_A.weight", f"{layer_name}.lora_B.weight"}
    return drawn


def draw_missing_head(heads: dict[str, nn.Module], filled: set[int], std: float, base_dtype: torch.dtype) -> None:
    """A head the checkpoint lacks, as from_pretrained draws it: normal(0, std) in the base dtype, zero bias."""
    for head_name, head in heads.items():
        missing = [p for p in head.parameters() if id(p) not in filled]
        if not missing:
            continue
        if not isinstance(head, nn.Linear):
            raise ValueError(f"the head {head_name} ({type(head).__name__}) is not in the checkpoint; cannot draw it")
        weight = torch.empty(head.weight.shape, dtype=base_dtype).normal_(0.0, std)
        head.weight.copy_(distributed.shard_like(weight.to(head.weight.device, head.weight.dtype), head.weight))
        if head.bias is not None:
            head.bias.zero_()


def draw_adapter(model: nn.Module, init_lora_weights: bool | str) -> None:
    """Each LoRA layer's A and B drawn in full on the CPU, as LoRALinear draws them, then this rank's shards kept."""
    for _, layer in lora_layers(model):
        d_in, r, d_out = layer.lora_A.in_features, layer.lora_A.out_features, layer.lora_B.out_features
        fresh_A, fresh_B = new_lora_pair(d_in, r, d_out, init_lora_weights, layer.lora_A.weight.dtype)
        for target, full in ((layer.lora_A.weight, fresh_A.weight), (layer.lora_B.weight, fresh_B.weight)):
            target.copy_(distributed.shard_like(full.to(target.device), target))
