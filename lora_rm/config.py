"""Configuration dataclasses: what a LoRA adapter is (serialised as PEFT's adapter_config.json)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

PEFT_TYPE = "LORA"
TASK_TYPE = "SEQ_CLS"
ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """A LoRA adapter; shared fields carry PEFT's names and defaults so they serialise to adapter_config.json."""

    r: int = 8  # rank of the update B @ A
    lora_alpha: int = 8  # update is scaled by lora_alpha / r (or / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # dropout on the adapter input only, never on the base path
    target_modules: list[str] | str | None = None  # names (exact or dotted suffix), a full-match regex, or "all-linear"
    exclude_modules: list[str] | str | None = None  # same matching rule; excludes win over targets
    use_rslora: bool = False  # rank-stabilised scaling lora_alpha / sqrt(r)
    init_lora_weights: bool | str = True  # True: kaiming A, zero B; "gaussian": N(0, 1/r) A, zero B; False: both random
    modules_to_save: list[str] | None = None  # the fully trainable head; None means detect it (score, classifier, ...)
    fan_in_fan_out: bool = False  # informational: Conv1D layers are always handled transposed
    bias: str = "none"  # only "none" is supported: biases stay frozen
    base_model_name_or_path: str | None = None  # where the base came from, for PEFT's loader

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig.lora_alpha must be positive, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"LoraConfig.init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}"
            )
        if self.bias != "none":
            raise ValueError(f"LoraConfig.bias={self.bias!r} is not supported; only 'none'")
        if self.target_modules is None:
            raise ValueError("LoraConfig.target_modules is required: a list of names, a regex or 'all-linear'")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)

    @property
    def scaling(self) -> float:
        """The factor on B @ A: alpha / r, or alpha / sqrt(r) for rsLoRA."""
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json that PEFT's LoraConfig.from_pretrained reads."""
        config = dataclasses.asdict(self)
        config.update(peft_type=PEFT_TYPE, task_type=TASK_TYPE, inference_mode=True)
        return config

    @classmethod
    def from_peft_dict(cls, config: dict[str, Any]) -> LoraConfig:
        """Read adapter_config.json as PEFT writes it; fields we do not implement must hold their defaults."""
        if config.get("peft_type", PEFT_TYPE) != PEFT_TYPE:
            raise ValueError(f"adapter is of peft_type {config.get('peft_type')!r}; lora-rm loads only {PEFT_TYPE}")
        if config.get("task_type") != TASK_TYPE:
            raise ValueError(
                f"adapter is of task_type {config.get('task_type')!r}; lora-rm loads only {TASK_TYPE} "
                "(a reward model is a sequence-classification model)"
            )
        for name, harmless in _UNSUPPORTED_PEFT_FIELDS.items():
            if config.get(name, harmless) not in (harmless, None, {}, [], False):
                raise ValueError(f"adapter uses PEFT's {name}={config[name]!r}, which lora-rm does not implement")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in known})


# PEFT options that change the math; an adapter using them would load but compute something else.
_UNSUPPORTED_PEFT_FIELDS: dict[str, Any] = {
    "use_dora": False,
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
}


@dataclass
class TrainConfig:
    """One training run; the CLI fills it from flags, and it is saved next to the adapter as train_config.json."""

    model: str = "builtin"  # hub id or local folder of a *ForSequenceClassification-capable model; "builtin": tiny
    dataset: str = "builtin"  # hub id, local file/folder, or "builtin" (generated arithmetic preferences)
    output: str = "runs/builtin"  # adapter + head land here; checkpoints/ and log.jsonl inside
    eval_dataset: str | None = None  # None: hold out eval_fraction of the training rows
    split: str = "train"  # split of dataset (a hub split or a datasets slice such as "train[:1800]")
    eval_split: str = "test"  # split of eval_dataset
    eval_fraction: float = 0.1  # held-out share when eval_dataset is None
    rows: str | None = None  # a slice of the training rows as text, e.g. ":1800"
    eval_rows: str | None = None  # a slice of the eval rows as text, e.g. "-512:" (the last 512)
    max_pairs: int | None = None  # keep the first N training rows (after rows)
    max_eval_pairs: int | None = None  # keep the first N eval rows (after eval_rows)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR))
    max_length: int = 512  # tokens per side (prompt + response)
    length_policy: str = "drop"  # "drop" pairs longer than max_length (TRL) or "truncate_left" (keep the end)
    skip_bad_rows: bool = False  # skip and count malformed rows instead of raising
    batch_size: int = 8  # pairs per device per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak learning rate of adapter and head
    head_lr: float | None = None  # its own peak learning rate for the head; None: lr
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    lr_schedule: str = "linear"  # "linear" or "cosine" decay after warmup, as transformers' schedulers
    warmup_ratio: float = 0.0  # share of total steps spent warming up linearly from 0
    epochs: float = 1.0  # passes over the training pairs (fractions allowed)
    max_steps: int | None = None  # overrides epochs when set
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None: no clipping
    center_rewards_coefficient: float | None = None  # TRL's reward centering: + coef * mean((rc + rr)^2)
    group_by_length: bool = False  # batch pairs of similar length to cut padding
    disable_dropout: bool = True  # TRL's default: the frozen base's dropout off (LoRA's own lora_dropout is kept)
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    reentrant_checkpointing: bool = False  # torch.utils.checkpoint's use_reentrant
    fsdp: bool = False  # under torchrun, shard the model with FSDP2 instead of DDP (for a model too big for one device)
    precision: str = "fp32"  # "fp32", "bf16" or "fp16" autocast (fp16 only on CUDA, with a grad scaler)
    seed: int = 42  # seeds model init, adapter init, dropout and data order
    log_every: int = 10  # optimizer steps between log lines
    eval_every: int | None = None  # optimizer steps between evaluations; always evaluated at the end
    save_every: int | None = None  # optimizer steps between checkpoints; always saved at the end
    keep_checkpoints: int = 2  # last K checkpoints kept
    resume: bool = False  # continue from the latest checkpoint in output/checkpoints
    overwrite: bool = False  # allow an output folder that already holds a run
    device: str | None = None  # None: cuda if available, else cpu
    trust_remote_code: bool = False  # run model code from the hub; off unless asked
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # read back from train_config.json
            self.lora = LoraConfig(**self.lora)
        checks = {
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "lr": self.lr > 0,
            "max_length": self.max_length >= 2,
            "epochs": self.epochs > 0,
            "keep_checkpoints": self.keep_checkpoints >= 1,
            "log_every": self.log_every >= 1,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "eval_fraction": 0 < self.eval_fraction < 1,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "length_policy": self.length_policy in ("drop", "truncate_left"),
            "lr_schedule": self.lr_schedule in ("linear", "cosine"),
            "precision": self.precision in ("fp32", "bf16", "fp16"),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is out of range")
        if self.resume and self.overwrite:
            raise ValueError("TrainConfig: resume and overwrite exclude each other")
