"""Configuration dataclasses: what a LoRA adapter is (serialised as PEFT's adapter_config.json)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
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
