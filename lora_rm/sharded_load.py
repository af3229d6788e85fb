"""--fsdp without the whole model on any host: build on the meta device, shard, then read each rank's pieces.

from_pretrained on every rank would hold a full copy per process before fully_shard cuts it. Instead the model
is built with its parameters on the meta device (no memory; buffers such as rotary tables stay real: they are
computed at construction, not saved), LoRA goes in and FSDP shards it as usual, `to_empty` allocates only the
local shards, and the checkpoint's safetensors tensors are read one at a time, each rank keeping its piece.

What the checkpoint lacks is drawn as the one-process path draws it, from the global RNG in the same order
(train() seeds it identically on every rank): the score head first (from_pretrained's normal(0,
initializer_range) in the base dtype), then each LoRA layer's A and B as LoRALinear's construction and
reset_parameters draw them. So --fsdp starts from the very weights one process starts from.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from torch import nn

from . import data, distributed
from .config import BUILTIN, TrainConfig
from .inject import head_modules, lora_config_of, lora_layers
from .lora import LoRALinear
from .scoring import torch_dtype


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
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    model_config = AutoConfig.from_pretrained(name, num_labels=1, trust_remote_code=trust_remote_code)
    with parameters_on_meta():
        model = AutoModelForSequenceClassification.from_config(
            model_config, dtype=torch_dtype(base_dtype), trust_remote_code=trust_remote_code
        )
    message = data.ensure_pad_token(tokenizer, model)
    if message:
        distributed.print_main(message)
    return model, tokenizer


def is_empty(model: nn.Module) -> bool:
    """True while some parameter is still on the meta device (built by empty_model_and_tokenizer, not yet filled)."""
    return any(param.is_meta for param in model.parameters())


def checkpoint_files(name: str) -> list[Path]:
    """The safetensors files of a local folder or a Hub id (downloaded); a pickle-only (.bin) folder is refused."""
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


def checkpoint_name(model_key: str) -> str:
    """The checkpoint's name of a model weight: LoRA wraps a layer's weight as ...q_proj.base_layer.weight."""
    return model_key.replace(".base_layer.", ".")


@torch.no_grad()
def load_shards(model: nn.Module, name: str, device: torch.device, base_dtype: str = "fp32") -> None:
    """Allocate this rank's shards of a model sharded on the meta device and fill them, one checkpoint tensor at a time.

    Weights the checkpoint has are read (lm_head and other extra keys are ignored); the head, if missing, and the
    adapter are drawn as in one process (module docstring). A parameter left without a value raises.
    """
    files = checkpoint_files(name)
    keys_by_file = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            keys_by_file[file] = list(handle.keys())
    in_checkpoint = {key for keys in keys_by_file.values() for key in keys}
    prefix = getattr(model, "base_model_prefix", "") + "."
    source = {}  # model key -> checkpoint key
    for key in model.state_dict(keep_vars=True):
        wanted = checkpoint_name(key)
        if wanted not in in_checkpoint and wanted.removeprefix(prefix) in in_checkpoint:  # a base-model checkpoint
            wanted = wanted.removeprefix(prefix)
        source[key] = wanted
    lora = lora_config_of(model)
    heads = head_modules(model, lora.modules_to_save)
    drawn = drawn_names(model, heads)
    aliases: dict[int, list[str]] = {}  # tied weights: one parameter, several names
    for key, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(key)
    unknown = [names[0] for names in aliases.values()
               if not any(source[key] in in_checkpoint or key in drawn for key in names)]  # fmt: skip
    if unknown:
        raise ValueError(f"{name}: the checkpoint has no weight for {', '.join(unknown)}; not training on empty memory")
    targets: dict[str, list[str]] = {}  # checkpoint key -> model keys
    for key, wanted in source.items():
        targets.setdefault(wanted, []).append(key)

    buffers = {key: buffer.clone() for key, buffer in model.named_buffers(remove_duplicate=False)}
    model.to_empty(device=device)  # only this rank's shards; buffers come back empty too
    for key, buffer in buffers.items():
        model.get_buffer(key).copy_(buffer)

    state = model.state_dict(keep_vars=True)  # after to_empty: FSDP may have replaced the parameter objects
    filled = set()
    for file, keys in keys_by_file.items():
        for key in keys:
            if key not in targets:
                continue
            # Open per tensor: a handle maps the file, and every page read stays resident until it is closed.
            with safe_open(file, framework="pt") as handle:
                full = handle.get_tensor(key)
            for model_key in targets[key]:
                target = state[model_key]
                if full.shape != target.shape:
                    shapes = f"{tuple(full.shape)}, the model wants {tuple(target.shape)}"
                    raise ValueError(f"{name}: {key} has shape {shapes}")
                if id(target) not in filled:
                    target.copy_(distributed.shard_like(full.to(device, target.dtype), target))
                    filled.add(id(target))
            del full
    draw_missing_head(heads, filled, model.config.get_text_config().initializer_range, torch_dtype(base_dtype))
    draw_adapter(model, lora.init_lora_weights)
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
        dtype = layer.lora_A.weight.dtype
        # LoRALinear builds two nn.Linear (each draws its default init), then reset_parameters draws again.
        fresh = SimpleNamespace(
            lora_A=nn.Linear(layer.lora_A.in_features, layer.lora_A.out_features, bias=False, dtype=dtype),
            lora_B=nn.Linear(layer.lora_B.in_features, layer.lora_B.out_features, bias=False, dtype=dtype),
        )
        LoRALinear.reset_parameters(fresh, init_lora_weights)
        for target, full in ((layer.lora_A.weight, fresh.lora_A.weight), (layer.lora_B.weight, fresh.lora_B.weight)):
            target.copy_(distributed.shard_like(full.to(target.device), target))
