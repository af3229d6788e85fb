"""Starting a run from a saved adapter (--init-adapter): the weights a run starts from, nothing else.

Two routes, told apart by the adapter's task_type:
    SEQ_CLS (a reward adapter, ours or PEFT's; head included): its LoRA settings must be the run's, resolved on
        the base module by module (targets, rank and alpha each); its adapter and head tensors replace the fresh
        ones, so the run's step-0 evaluation is `lora-rm eval --adapter DIR`'s.
    CAUSAL_LM with merge_init (an SFT run's adapter; no head): merged into the base first, W + s B A, as PEFT's
        merge_and_unload; the reward adapter and the head then start fresh on top, as without it.

Not a resume: the optimizer, the schedule and the data order start fresh. OUTPUT/init_adapter.json records where
the run started (the folder and a SHA-256 of its weights); a resume re-applies the init before the checkpoint is
loaded over it, and refuses an init folder whose weights changed since (a merged SFT adapter is part of the base).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .adapter_io import (
    WEIGHTS_NAME,
    adapter_config_from,
    adapter_state_dict,
    load_adapter_weights,
    read_adapter_json,
    read_adapter_weights,
)
from .atomic import write_json
from .config import BUILTIN, TASK_TYPE, LoraConfig, TrainConfig, is_weight_init
from .inject import add_lora, merge_lora, remove_lora, resolve_layout
from .model_io import same_base

SFT_TASK_TYPE = "CAUSAL_LM"  # PEFT's task_type of a causal-LM (SFT) adapter
RECORD_NAME = "init_adapter.json"  # in the output folder: where the run started
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")  # adapter_state_dict's adapter keys


def read_init_config(path: str | Path, merge_init: bool) -> LoraConfig:
    """The init adapter's LoraConfig, once its task type is the one the route takes (SEQ_CLS, or CAUSAL_LM to merge)."""
    raw = read_adapter_json(path)
    task = raw.get("task_type")
    if merge_init and task != SFT_TASK_TYPE:
        raise ValueError(f"--merge-init takes a {SFT_TASK_TYPE} adapter (an SFT run's); {path} is task_type {task!r}"
                         f"{': a reward adapter, continue from it without --merge-init' if task == TASK_TYPE else ''}")
    if not merge_init and task == SFT_TASK_TYPE:
        raise ValueError(f"--init-adapter {path} is a {SFT_TASK_TYPE} adapter (an SFT run's, no reward head): add "
                         "--merge-init to merge it into the base and start a fresh reward adapter on top")
    config = adapter_config_from({**raw, "task_type": TASK_TYPE} if merge_init else raw, path)
    if is_weight_init(config.init_lora_weights):
        raise ValueError(f"--init-adapter {path} holds an unconverted {config.init_lora_weights} adapter (trained on "
                         "W_res, e.g. a checkpoint's): start from the run's final folder, which save_adapter converted")
    return config


def init_lora_config(path: str | Path) -> LoraConfig:
    """A reward adapter's LoRA settings as a run's: what `train --init-adapter DIR` trains unless flags differ."""
    adapter = read_init_config(path, merge_init=False)
    return dataclasses.replace(adapter, init_lora_weights=True, base_model_name_or_path=None)


def check_base(adapter: LoraConfig, model: str, path: str | Path) -> None:
    """Refuse an adapter saved for another base (its base_model_name_or_path; unset or empty: nothing to check)."""
    saved = adapter.base_model_name_or_path
    if saved and (model == BUILTIN or not same_base(saved, model)):
        raise ValueError(f"--init-adapter {path} was trained on the base {saved!r} (base_model_name_or_path in its "
                         f"adapter_config.json), not --model {model!r}; train on that base (if it is the same "
                         "model saved elsewhere, set base_model_name_or_path to --model)")


def check_settings_match(model: nn.Module, lora: LoraConfig, adapter: LoraConfig, path: str | Path) -> None:
    """Refuse LoRA settings other than the adapter's, naming the first that differs: variant, targets, rank, alpha."""
    where = f"--init-adapter {path}"
    hint = "leave the LoRA flags out to take the adapter's settings"
    for name in ("use_dora", "use_rslora"):
        if getattr(lora, name) != getattr(adapter, name):
            raise ValueError(f"{where} has {name}={getattr(adapter, name)} in its adapter_config.json, this run "
                             f"{name}={getattr(lora, name)}; {hint}")
    mine, saved = resolve_layout(model, lora)[1], resolve_layout(model, adapter)[1]  # each module's (rank, alpha)
    if mine.keys() != saved.keys():
        only_saved, only_mine = sorted(saved.keys() - mine.keys()), sorted(mine.keys() - saved.keys())
        raise ValueError(f"{where} adapts other modules than this run's target_modules={lora.target_modules!r}: "
                         f"{len(saved)} vs {len(mine)}; only the adapter's: {only_saved[:3]}, only this run's: "
                         f"{only_mine[:3]}; {hint}")
    for module in sorted(saved):
        for index, (name, flag) in enumerate((("rank", "--lora-r/--rank-pattern"),
                                               ("lora_alpha", "--lora-alpha/--alpha-pattern"))):
            if mine[module][index] != saved[module][index]:
                raise ValueError(f"{where} has {name} {saved[module][index]:g} at {module}, this run "
                                 f"{mine[module][index]:g} ({flag}); {hint}")


def merge_sft_adapter(model: nn.Module, adapter: LoraConfig, weights: dict[str, torch.Tensor],
                      path: str | Path) -> None:
    """Fold a CAUSAL_LM adapter into the base weights; the head is left as it was loaded.

    PEFT saves an SFT adapter under the causal LM's module names; *ForSequenceClassification keeps the same body
    (model.layers..., transformer.h...), so the keys match, and check_adapter_covers_base names any that do not.
    """
    if adapter.modules_to_save:
        raise ValueError(f"--merge-init {path} also trains whole modules ({adapter.modules_to_save}, "
                         "modules_to_save); only its LoRA layers can be merged into the base")
    with torch.random.fork_rng(devices=[]):  # add_lora's A init draws: keep them out of the run's stream
        add_lora(model, dataclasses.replace(adapter, lora_dropout=0.0, init_lora_weights=True))
    head = {key: tensor for key, tensor in adapter_state_dict(model).items() if not key.endswith(LORA_SUFFIXES)}
    try:
        load_adapter_weights(model, {**weights, **head})  # the head's own tensors: copied onto themselves
    except ValueError:
        remove_lora(model)
        raise
    merge_lora(model)


def add_lora_from_init(model: nn.Module, config: TrainConfig) -> None:
    """add_lora as configured; with init_adapter, the SFT adapter merged into the base first (merge_init) or the
    reward adapter's tensors loaded over the fresh ones."""
    if config.init_adapter is None:
        add_lora(model, config.lora)
        return
    path = config.init_adapter
    adapter = read_init_config(path, config.merge_init)
    check_base(adapter, config.model, path)
    weights = read_adapter_weights(path)
    check_unchanged(config)
    if config.merge_init:
        merge_sft_adapter(model, adapter, weights, path)
        add_lora(model, config.lora)
        distributed.print_main(f"merged the SFT adapter {path} into the base; a fresh reward adapter on top")
        return
    check_settings_match(model, config.lora, adapter, path)
    add_lora(model, config.lora)
    load_adapter_weights(model, weights)
    distributed.print_main(f"starting from the adapter and head in {path} (a fresh optimizer and schedule)")


def init_record(config: TrainConfig) -> dict[str, Any]:
    """Where a run started: the init folder, its route, and the SHA-256 of its weights file."""
    weights = Path(config.init_adapter) / WEIGHTS_NAME
    return {"init_adapter": str(Path(config.init_adapter).resolve()), "merge_init": config.merge_init,
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}


def check_unchanged(config: TrainConfig) -> None:
    """On a resume, refuse an init folder whose weights differ from those the run started from."""
    record_path = Path(config.output) / RECORD_NAME
    if not (config.resume and record_path.is_file()):
        return
    try:
        started = json.loads(record_path.read_text())["sha256"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"cannot resume: {record_path} is corrupt ({error!r})") from error
    if init_record(config)["sha256"] != started:
        raise ValueError(f"--resume: the weights in --init-adapter {config.init_adapter} changed since this run "
                         f"started from them ({record_path}); restore them, or start a new run")


def record_init(config: TrainConfig, output: Path) -> None:
    """Write OUTPUT/init_adapter.json when the run starts from an adapter (rank 0)."""
    if config.init_adapter is None:
        return
    write_json(output / RECORD_NAME, init_record(config))
