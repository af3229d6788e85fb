"""Putting LoRA into a Hugging Face model: match targets, wrap them, freeze the rest, keep the head trainable."""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.pytorch_utils import Conv1D

from .config import ALL_LINEAR, LoraConfig
from .inits import restore_base_weight
from .lora import LoRALinear

# Names HF gives the head of *ForSequenceClassification models (PEFT's SEQ_CLS_HEAD_NAMES plus BART's).
HEAD_NAMES = ("score", "classifier", "classification_head")
LINEAR_TYPES = (nn.Linear, Conv1D)


def find_head_names(model: nn.Module) -> list[str]:
    """The top-level head module(s) that must stay fully trainable outside the adapter."""
    heads = [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]
    if not heads:
        children = [name for name, _ in model.named_children()]
        raise ValueError(
            f"no sequence-classification head ({', '.join(HEAD_NAMES)}) on {type(model).__name__}; "
            f"its top-level modules are {children}. Load it with AutoModelForSequenceClassification(num_labels=1) "
            "or name the head in LoraConfig.modules_to_save"
        )
    return heads[:1]


def _matches(name: str, patterns: list[str] | str) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches the exact name or a dotted suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == pattern or name.endswith(f".{pattern}") for pattern in patterns)


def _inside(name: str, module_names: list[str]) -> bool:
    """True for a module that is, or lies inside, one of module_names (matched as dotted suffixes)."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in module_names)


def _is_target(name: str, config: LoraConfig) -> bool:
    """PEFT's check_target_module_exists: a regex string matches whole, a list entry matches the exact name (then
    layers_to_transform is not consulted, as in PEFT) or a dotted suffix (then the module's layer must be selected)."""
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    return any(name.endswith(f".{target}") for target in targets) and in_selected_layer(name, config)


# layers_to_transform / layers_pattern, PEFT's rule (tuners_utils.check_target_module_exists). A module's layer index
# is the first number that stands as its own name part:
#   - with layers_pattern (e.g. "layers", "h", "layer"): the number right after that part (the pattern is a regex);
#   - without: the first number after at least two name parts, so "model.layers.3.mlp.up_proj" -> 3 and GPT-2's
#     "transformer.h.3.attn.c_attn" -> 3. The first, not the last: a MoE's "layers.1.experts.0" is layer 1.
# A module with no such number is not adapted at all when layers_to_transform is set; an empty list selects all.
def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The layer a module lies in, read from its name as PEFT reads it; None when the name has none."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next(filter(None, (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name) for p in patterns)), None)
    return int(match["idx"]) if match else None


def in_selected_layer(name: str, config: LoraConfig) -> bool:
    """True unless layers_to_transform is set and the module's layer (layer_index) is not one of them."""
    layers = config.layers_to_transform
    if layers is None or layers == []:
        return True
    index = layer_index(name, config.layers_pattern)
    return index is not None and index in ([layers] if isinstance(layers, int) else layers)


# rank_pattern / alpha_pattern, PEFT's rule (utils.other.get_pattern_key, PEFT >= 0.15): the first key, in the dict's
# order, that is a regex matching the end of the full module name, from its start or right after a dot:
# re.match(rf"(.*\.)?({key})$", name). So "v_proj" picks every v_proj, "layers.0.self_attn.v_proj" one of them and
# "^model.layers.0.self_attn.v_proj" only the module of exactly that name. Unmatched modules keep r / lora_alpha.
# (PEFT < 0.15 used rf".*\.{key}$": keys needed a dot before them, so "^..." keys matched nothing.) Order matters
# when keys overlap, so add_lora keeps the resolved value of each module under its full name for saving.
def pattern_value(patterns: dict[str, float], name: str, default: float) -> float:
    """The rank (or alpha) rank_pattern (or alpha_pattern) gives the module `name`; default when no key matches."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return patterns.get(name, default)


def find_target_names(model: nn.Module, config: LoraConfig, head_names: list[str]) -> list[str]:
    """Names of the modules to wrap; excludes and the head win over targets."""
    all_linear = isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR
    targets = []
    for name, module in model.named_modules():
        if not name or _inside(name, head_names):
            continue
        if config.exclude_modules and _matches(name, config.exclude_modules):
            continue
        if all_linear:
            if isinstance(module, LINEAR_TYPES):
                targets.append(name)
        elif _is_target(name, config):
            if not isinstance(module, LINEAR_TYPES):
                raise TypeError(
                    f"target module {name!r} is a {type(module).__name__}; lora-rm adapts only nn.Linear and "
                    "Conv1D layers. Name the linear layers inside it instead"
                )
            targets.append(name)
    if not targets and any(_matches(name, config.target_modules) for name, _ in model.named_modules()):
        raise ValueError(
            f"target_modules={config.target_modules!r} with layers_to_transform={config.layers_to_transform!r} "
            f"(layers_pattern={config.layers_pattern!r}) matched no module of {type(model).__name__}: no targeted "
            "module lies in those layers. Check the indices, and layers_pattern against the model's module names"
        )
    if not targets:
        raise ValueError(_no_match_message(model, config.target_modules))
    return targets


def _no_match_message(model: nn.Module, target_modules: list[str] | str) -> str:
    """Name the linear layers closest to what the user asked for (minLoRA's silent no-op is the anti-example)."""
    linear_names = sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, LINEAR_TYPES)})
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    nearest = sorted({close for w in wanted for close in difflib.get_close_matches(w.split(".")[-1], linear_names)})
    return (
        f"target_modules={target_modules!r} matched no module of {type(model).__name__}. "
        f"Nearest linear layer names: {nearest or 'none'}; all linear layer names: {linear_names}"
    )


def resolve_layout(model: nn.Module, config: LoraConfig) -> tuple[list[str], dict[str, tuple[float, float]]]:
    """The head names and each target's (rank, alpha) on this model: what add_lora wraps, and what warm_start
    compares two configs by, from one place."""
    head_names = config.modules_to_save or find_head_names(model)
    return head_names, {name: (pattern_value(config.rank_pattern, name, config.r),
                               pattern_value(config.alpha_pattern, name, config.lora_alpha))
                        for name in find_target_names(model, config, head_names)}


def add_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap the target layers in place, freeze the base, leave the head trainable; returns model."""
    if any(True for _ in lora_layers(model)):
        raise ValueError("the model already has LoRA layers; merge_lora or reload the base before add_lora")
    head_names, layout = resolve_layout(model, config)
    model.requires_grad_(False)
    has_conv1d = False
    for name, (rank, alpha) in layout.items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base_layer = getattr(parent, child_name)
        has_conv1d |= isinstance(base_layer, Conv1D)
        wrapped = LoRALinear(
            base_layer, rank, alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights, config.use_dora,
        )
        setattr(parent, child_name, wrapped)
    for head in head_modules(model, head_names).values():
        keep_fp32(head)
        head.requires_grad_(True)
    # Saved like PEFT: targets resolved to full names ("all-linear" too), the head named; rank/alpha patterns
    # resolved to full names too (each key then matches one module, so key order no longer matters). Kept on the
    # model itself because there is no wrapper to keep it on (PEFT keeps peft_config on its PeftModel); remove_lora
    # deletes it.
    model.lora_rm_config = dataclasses.replace(
        config, target_modules=sorted(layout), modules_to_save=list(head_names), fan_in_fan_out=has_conv1d,
        rank_pattern={name: r for name, (r, _) in sorted(layout.items()) if r != config.r},
        alpha_pattern={name: alpha for name, (_, alpha) in sorted(layout.items()) if alpha != config.lora_alpha},
    )
    return model


def keep_fp32(head: nn.Module) -> None:
    """Store a half-precision head in fp32: AdamW's updates to a bf16 head round away (unlike PEFT, which trains
    its head copy in bf16).

    A pre-hook casts the hidden states coming from the half base to the head's dtype, whatever it is later; it
    stays after merge_lora/remove_lora, so the merged model keeps working with its fp32 head.
    """
    if not any(p.dtype in (torch.float16, torch.bfloat16) for p in head.parameters()):
        return
    head.float()
    if _cast_to_head_dtype not in head._forward_pre_hooks.values():
        head.register_forward_pre_hook(_cast_to_head_dtype)


def _cast_to_head_dtype(head: nn.Module, args: tuple) -> tuple:
    dtype = next(head.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def head_modules(model: nn.Module, head_names: list[str]) -> dict[str, nn.Module]:
    """The head modules by full name (PEFT matches modules_to_save as a dotted suffix)."""
    heads = {name: m for name, m in model.named_modules() if name and _matches(name, head_names)}
    if not heads:
        raise ValueError(f"modules_to_save={head_names} matched no module of {type(model).__name__}")
    return heads


def lora_config_of(model: nn.Module) -> LoraConfig:
    """The LoraConfig add_lora attached to the model (targets resolved to full names)."""
    config = getattr(model, "lora_rm_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapter: call add_lora or load_adapter first")
    return config


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every LoRALinear with its full module name."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layers back; returns model."""
    if not any(True for _ in lora_layers(model)):
        raise ValueError("merge_lora: the model has no LoRA layers")
    for _, layer in lora_layers(model):
        layer.merge()
    return remove_lora(model)


def remove_lora(model: nn.Module) -> nn.Module:
    """Put each wrapped base layer back in place of its LoRALinear (dropping unmerged updates); returns model.

    An unmerged PiSSA/OLoRA layer gets its original W back first (W_res + s B0 A0, inits.py).
    """
    for name, layer in list(lora_layers(model)):
        if not layer.merged and getattr(layer, "initial_lora", None) is not None:
            restore_base_weight(layer)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.base_layer)
    model.__dict__.pop("lora_rm_config", None)
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    return trainable, sum(p.numel() for p in unique)


def format_parameter_counts(model: nn.Module) -> str:
    """The one-line summary PEFT's print_trainable_parameters gives."""
    trainable, total = parameter_counts(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def enable_input_require_grads(model: nn.Module) -> RemovableHandle:
    """Make the embeddings' output require grad, so reentrant checkpointing of a frozen base still backprops.

    With use_reentrant=True, torch.utils.checkpoint only tracks a segment whose *inputs* require grad; a
    frozen embedding gives none, so every LoRA gradient inside comes back silently None.
    """

    def make_output_require_grad(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    return model.get_input_embeddings().register_forward_hook(make_output_require_grad)


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool = False) -> RemovableHandle | None:
    """Turn on HF's activation checkpointing; adds the input-grad hook that reentrant mode needs."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    # transformers 5.x registers its own input-grad hook here (older releases only under PEFT): drop it, so
    # the behaviour is ours and the same on every version.
    if hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()
    return enable_input_require_grads(model) if use_reentrant else None
