"""Adapters on disk in PEFT's format: adapter_model.safetensors + adapter_config.json, both ways."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_path
from .config import LoraConfig
from .inits import plain_lora_config, plain_lora_tensors
from .inject import (
    LINEAR_TYPES,
    add_lora,
    head_modules,
    in_selected_layer,
    lora_config_of,
    lora_layers,
    remove_lora,
)
from .lora import LoRALinear

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps the HF model twice; its saved keys carry both levels


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for a SEQ_CLS LoRA: every lora_A/lora_B (DoRA's magnitude) and the head, PEFT's keys."""
    state = {}
    for name, layer in lora_layers(model):
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
        if layer.use_dora:  # PEFT saves it without ".weight", though its live parameter has one
            state[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    # PEFT raises a KeyError at load when the head is missing: always save it.
    for head_name, head in head_modules(model, lora_config_of(model).modules_to_save).items():
        for param_name, tensor in head.state_dict().items():
            state[f"{PEFT_PREFIX}{head_name}.{param_name}"] = tensor
    return state


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    state: dict[str, torch.Tensor] | None = None,
    convert_to_plain: bool = True,
) -> None:
    """Write the adapter in PEFT's format; each file goes to a temporary name first, so a crash keeps the old one.

    state: the tensors to write under adapter_state_dict's keys (e.g. gathered from shards); default the model's.
    convert_to_plain: a PiSSA/OLoRA adapter is written as a plain rank-2r LoRA on the original base (inits.py), so
    it loads anywhere; False writes it as trained, on W_res (checkpoints: a resume redoes the init on the base).
    """
    if any(layer.merged for _, layer in lora_layers(model)):
        raise ValueError("save_adapter: the adapter is merged into the base; unmerge before saving")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model) if state is None else state
    config = lora_config_of(model)
    initial = {f"{PEFT_PREFIX}{name}": layer.initial_lora for name, layer in lora_layers(model)
               if getattr(layer, "initial_lora", None) is not None}
    if convert_to_plain and initial:
        state, config = plain_lora_tensors(initial, state), plain_lora_config(config)
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in state.items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    config_text = json.dumps(config.to_peft_dict(), indent=2, sort_keys=True)
    with atomic_path(directory / CONFIG_NAME) as tmp:
        Path(tmp).write_text(config_text + "\n")


def read_adapter_json(path: str | os.PathLike) -> dict:
    """adapter_config.json as a dict, any task type, naming the file when it is missing or corrupt."""
    config_path = Path(path) / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a saved adapter folder")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path} holds a JSON {type(raw).__name__}, not an object of PEFT's LoRA settings")
    return raw


def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    """Parse adapter_config.json (ours or PEFT's), naming the file when it is missing or corrupt."""
    return adapter_config_from(read_adapter_json(path), path)


def adapter_config_from(raw: dict, path: str | os.PathLike) -> LoraConfig:
    """LoraConfig.from_peft_dict, its errors naming path's adapter_config.json and the field."""
    try:
        return LoraConfig.from_peft_dict(raw)
    except (TypeError, ValueError) as error:  # its field, not the --flag the CLI would name for LoraConfig.x
        raise ValueError(f"{Path(path) / CONFIG_NAME}: {str(error).replace('LoraConfig.', '')}") from error


def read_adapter_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load adapter_model.safetensors (never a pickle), naming the file when it is missing or corrupt."""
    weights_path = Path(path) / WEIGHTS_NAME
    if not weights_path.is_file():
        hint = " (adapter_model.bin is a pickle; lora-rm loads safetensors only)" if (
            Path(path) / "adapter_model.bin"
        ).exists() else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}{hint}")
    try:
        return load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights_path} is corrupt or not a safetensors file: {error}") from error


def _family(name: str) -> str:
    """A module's kind across layers: model.layers.3.self_attn.q_proj -> model.layers.N.self_attn.q_proj."""
    return re.sub(r"\.\d+(?=\.|$)", ".N", name)


def _some(names: list[str]) -> str:
    return f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''} ({len(names)} in all)"


def check_adapter_covers_base(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Every saved module is in the base, and every base module of a saved kind, in a layer the adapter's
    layers_to_transform selects, has saved weights.

    Targets are saved as full names, so an adapter trained on 2 layers would otherwise load onto a 4-layer
    base of the same width and silently leave layers 2-3 unadapted. A layer left out by layers_to_transform
    was left out on purpose: its modules are not expected.
    """
    suffix = ".lora_A.weight"
    saved = {key[len(PEFT_PREFIX) : -len(suffix)] for key in weights if key.endswith(suffix)}
    modules = dict(model.named_modules())
    not_in_base = sorted(saved - set(modules))
    families = {_family(name) for name in saved}
    config = lora_config_of(model)
    uncovered = sorted(
        name for name, module in modules.items()
        if name not in saved and _family(name) in families and isinstance(module, (*LINEAR_TYPES, LoRALinear))
        and in_selected_layer(name, config)
    )
    problems = []
    if not_in_base:
        problems.append(f"{len(not_in_base)} of its {len(saved)} adapted modules are not in the base: "
                        f"{_some(not_in_base)}")
    if uncovered:
        selected = config.layers_to_transform
        layers = "" if selected is None else f" (in its layers_to_transform={selected})"
        problems.append(f"{len(uncovered)} base modules of the kinds it adapts{layers} have no saved weights: "
                        f"{_some(uncovered)}")
    if problems:
        raise ValueError(
            f"adapter does not fit {type(model).__name__}: {'; '.join(problems)}. It was trained on another "
            "base (e.g. one with a different number of layers); load it on the model it was trained on"
        )


def matched_adapter_tensors(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's adapter and head tensors by key, once every saved key is checked to fit: name and shape."""
    check_adapter_covers_base(model, weights)
    targets = adapter_state_dict(model)
    missing = sorted(set(targets) - set(weights))
    unexpected = sorted(set(weights) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"adapter does not fit {type(model).__name__}: missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, target in targets.items():
        if weights[key].shape != target.shape:
            rank_hint = ""
            if key.endswith(("lora_A.weight", "lora_B.weight")):
                rank_hint = " (the model's rank comes from adapter_config.json's r and rank_pattern)"
            raise ValueError(
                f"adapter does not fit the base model: {key} has shape {tuple(weights[key].shape)} in the file "
                f"but {tuple(target.shape)} in the model{rank_hint}"
            )
    return targets


@torch.no_grad()
def load_adapter_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into the model's adapter and head; every key must be there with the right shape."""
    for key, target in matched_adapter_tensors(model, weights).items():
        target.copy_(weights[key])


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Add the LoRA described in path's adapter_config.json to a plain HF model and load its weights."""
    config = read_adapter_config(path)
    weights = read_adapter_weights(path)
    if isinstance(config.init_lora_weights, str) and config.init_lora_weights.startswith("pissa_niter"):
        warnings.warn(
            f"{path} holds an unconverted {config.init_lora_weights} adapter: its residual base W_res is rebuilt "
            "with a randomized SVD drawing other random numbers than training did, so it differs by the SVD's "
            "approximation error (save_adapter converts by default; a checkpoint's adapter is not converted)",
            stacklevel=2,
        )
    add_lora(model, config)
    try:
        load_adapter_weights(model, weights)
    except ValueError:
        remove_lora(model)  # no half-loaded adapter left behind (the base stays frozen)
        raise
    return model
