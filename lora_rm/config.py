"""The dataclasses: a LoRA adapter (serialised as PEFT's adapter_config.json), a training run (the CLI's flags, saved
as train_config.json) and the reward server's settings (`lora-rm serve`)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PEFT_TYPE = "LORA"
TASK_TYPE = "SEQ_CLS"
ALL_LINEAR = "all-linear"
BUILTIN = "builtin"  # --model/--dataset value for the offline demo task (lora_rm/builtin.py)
LENGTH_POLICIES = ("drop", "truncate_left")  # what to do with a pair longer than max_length
RANKING_LOSSES = ("all_pairs", "plackett_luce")  # losses of K-way rows (lora_rm/ranking.py)
PRECISIONS = ("fp32", "bf16", "fp16")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")  # where training logs go besides log.jsonl (trackers.py)
PACKING_MODES = ("none", "padding_free", "shared_prompt", "auto")  # lora_rm/packing.py
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # torch.<name>, without importing torch here


def is_weight_init(init: bool | str) -> bool:
    """True for PiSSA/OLoRA: inits that read A and B off the base weight and replace it with W - s B A (inits.py)."""
    return isinstance(init, str) and re.fullmatch(r"pissa|pissa_niter_\d+|olora", init) is not None


def report_targets(report_to: str | list[str]) -> list[str]:
    """The trackers --report-to names: comma-separated text or a list, "none" dropped, each named once."""
    names = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    return [name for name in dict.fromkeys(part.strip() for part in names) if name != "none"]


def check_rules(config: Any, owner: str, rules: dict[str, tuple[bool, str]]) -> None:
    """Raise for the first field whose rule fails: `owner.field must be rule, got value` (TrainConfig, ServeConfig)."""
    for name, (holds, rule) in rules.items():
        if not holds:
            raise ValueError(f"{owner}.{name} must be {rule}, got {getattr(config, name)!r}")


def option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field whose help text (and choices) the CLI turns into a flag: one source for every default."""
    return field(default=default, metadata={"help": help, "choices": choices})


def is_positive_number(value: Any) -> bool:
    """An int or float above 0 and finite: a NaN or inf alpha makes every reward NaN (NaN <= 0 is False, too)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < math.inf


@dataclass
class LoraConfig:
    """A LoRA adapter; shared fields carry PEFT's names and defaults so they serialise to adapter_config.json."""

    r: int = option(8, "rank of the update B @ A")
    lora_alpha: int = option(8, "the update is scaled by lora_alpha / r (or / sqrt(r) with use_rslora)")
    lora_dropout: float = option(0.0, "dropout on the adapter's input only, never on the base path")
    target_modules: list[str] | str | None = option(
        None, "'all-linear', names (exact or dotted suffix; comma-separated on the command line) or a full-match regex"
    )
    exclude_modules: list[str] | str | None = None  # same matching rule; excludes win over targets
    use_rslora: bool = option(False, "rank-stabilised scaling lora_alpha / sqrt(r)")
    use_dora: bool = option(False, "DoRA: each output row of W + s B A rescaled to a trained length (see dora.py)")
    init_lora_weights: bool | str = option(
        True, "True: kaiming A, zero B; 'gaussian': A ~ normal(std 1/r); False: random (tests); 'pissa', "
        "'pissa_niter_K', 'olora': A, B from the base weight's SVD/QR, W replaced by W - s B A (lora_rm/inits.py)"
    )
    modules_to_save: list[str] | None = None  # the fully trainable head; None means detect it (score, classifier, ...)
    fan_in_fan_out: bool = False  # written for PEFT's loader (True for GPT-2's Conv1D); we read the layer type instead
    bias: str = "none"  # only "none" is supported: biases stay frozen
    base_model_name_or_path: str | None = None  # where the base came from, for PEFT's loader
    # Per-module rank / alpha and layer selection: PEFT's rules, implemented in inject.py (see its comments).
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={
        "help": "rank per module, PEFT's rule: a key (regex) matching the end of a module's name after a dot, first "
                "key wins; JSON on the command line, e.g. '{\"v_proj\": 16}'"})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={
        "help": "lora_alpha per module, matched as rank_pattern; JSON on the command line"})
    layers_to_transform: list[int] | int | None = option(
        None, "adapt only these layer indices (comma-separated); needs target_modules as names, not a regex"
    )
    layers_pattern: list[str] | str | None = option(
        None, "name of the layer list whose index layers_to_transform reads (e.g. 'layers', 'h'); default: the "
        "first number after two name parts"
    )

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not is_positive_number(self.lora_alpha):
            raise ValueError(f"LoraConfig.lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in (True, False, "gaussian") and not is_weight_init(self.init_lora_weights):
            raise ValueError(
                "LoraConfig.init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_K' (K an "
                f"integer) or 'olora', got {self.init_lora_weights!r}"
            )
        if self.bias != "none":
            raise ValueError(f"LoraConfig.bias={self.bias!r} is not supported; only 'none'")
        if self.target_modules is None:
            raise ValueError("LoraConfig.target_modules is required: a list of names, a regex or 'all-linear'")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        self._check_patterns()

    def _check_patterns(self) -> None:
        """rank_pattern/alpha_pattern/layers_* as PEFT's LoraConfig accepts them, with PEFT's refusals."""
        self.rank_pattern = dict(self.rank_pattern or {})  # PEFT writes {}; None would crash its loader
        self.alpha_pattern = dict(self.alpha_pattern or {})
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        for key, value in self.alpha_pattern.items():
            if not is_positive_number(value):
                raise ValueError(f"LoraConfig.alpha_pattern[{key!r}] must be a positive number, got {value!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, name):
                try:
                    re.compile(key)
                except re.error as error:
                    raise ValueError(f"LoraConfig.{name} key {key!r} is not a regex ({error})") from error
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        layers = self.layers_to_transform
        indices = [layers] if isinstance(layers, int) else layers if isinstance(layers, list) else [None]
        if layers is not None and any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
            raise ValueError(f"LoraConfig.layers_to_transform must be a layer index or a list of them, got {layers!r}")
        if isinstance(self.layers_pattern, tuple):
            self.layers_pattern = list(self.layers_pattern)
        # PEFT's refusals: a regex string (all-linear too) is matched whole, so there is no layer part to select on.
        for name in ("layers_to_transform", "layers_pattern"):
            if isinstance(self.target_modules, str) and getattr(self, name) is not None:
                raise ValueError(
                    f"LoraConfig.{name} cannot be used with target_modules={self.target_modules!r}, a string (PEFT "
                    "refuses it too): name the modules as a list, e.g. ['q_proj', 'v_proj']"
                )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("LoraConfig.layers_pattern needs layers_to_transform (PEFT refuses it alone)")

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
    "lora_bias": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
}


@dataclass
class TrainConfig:
    """One training run; the CLI builds its flags from these fields, and it is saved as train_config.json."""

    model: str = option(BUILTIN, "hub id or local folder of the base model; 'builtin': a tiny offline Llama")
    dataset: str = option(BUILTIN, "hub id, local .json/.jsonl(.gz)/.parquet/.csv file or folder, or 'builtin'")
    output: str = option("runs/builtin", "folder for the adapter, log.jsonl and checkpoints/")
    eval_dataset: str | list[str] | None = option(
        None, "held-out preferences (repeat the flag for several, each logged apart); default: the last eval_fraction "
        "of dataset")
    split: str = option("train", "split of dataset: a hub split or a slice such as 'train[:1800]'")
    eval_split: str | None = option(None, "split of eval_dataset, slices too ('test[:500]'); unset: 'test' of a hub "
                                    "id, all of a local file")
    eval_fraction: float = option(0.1, "held-out share of the training rows when no eval_dataset is named")
    rows: str | None = option(None, "a slice of the training rows as text, e.g. ':1800' (applied before max_rows)")
    eval_rows: str | None = option(None, "a slice of the eval rows as text, e.g. '-512:' for the last 512")
    max_rows: int | None = option(None, "keep the first N training rows (after rows)")
    max_eval_rows: int | None = option(None, "keep the first N eval rows (after eval_rows)")
    base_dtype: str = option("fp32", "dtype the frozen base weights are stored in (adapter and head stay fp32); "
                             "fp32 by default: the parity contract's dtype, and CPUs compute it fastest", PRECISIONS)
    load_in_4bit: bool = option(False, "QLoRA: quantize the base's linear layers to nf4 with bitsandbytes "
                                "(pip install 'lora-rm[qlora]'); the head is never quantized")
    bnb_4bit_compute_dtype: str = option("bf16", "dtype a 4-bit layer computes in", PRECISIONS)
    # Two defaults on purpose: LoraConfig's r=8, alpha=8 are PEFT's, so a LoraConfig() means what PEFT's does; a
    # training run starts from the README's recipe (r=16, alpha=32 = 2r, every linear layer), the one it measures.
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR))
    max_length: int = option(512, "tokens per side (prompt + response)")
    length_policy: str = option("drop", "pairs longer than max_length: drop them (TRL) or keep each side's end",
                                LENGTH_POLICIES)
    skip_bad_rows: bool = option(False, "skip and count malformed rows (malformed JSON lines too) instead of stopping "
                                 "at the first")
    batch_size: int = option(8, "pairs per process per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-4, "peak learning rate of the adapter and the head")
    head_lr: float | None = option(None, "peak learning rate of the head; default: lr")
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay")
    loraplus_lr_ratio: float | None = option(None, "LoRA+: lora_B's learning rate is this times lr (lora_A's); "
                                             "the paper suggests 16; unset: plain LoRA")
    lr_schedule: str = option("linear", "decay after warmup, as transformers' schedulers", ("linear", "cosine"))
    warmup_ratio: float = option(0.0, "share of the steps spent warming up linearly from 0")
    epochs: float = option(1.0, "passes over the training pairs (fractions allowed)")
    max_steps: int | None = option(None, "optimizer steps; overrides epochs when set")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this; inf: no clipping")
    center_rewards_coefficient: float | None = option(None, "TRL's reward centering: + coef * mean((rc + rr)^2)")
    ranking_loss: str = option("all_pairs", "loss of K-way rows (responses + scores, or chosen/rejected lists): "
                               "Bradley-Terry over every pair with different scores, or listwise Plackett-Luce; "
                               "both equal the pair loss at K = 2", RANKING_LOSSES)
    group_by_length: bool = option(False, "batch pairs of similar length to cut padding")
    packing: str = option("auto", "none: padded rows; padding_free: a micro-batch's sequences end to end, attention "
                          "kept within each; shared_prompt: also a pair's common prompt computed once (decoders; "
                          "encoders fall back to padding_free); auto: shared_prompt for decoders, padding_free for "
                          "encoders, none for untested architectures and K-way rows. Every mode gives the padded "
                          "path's rewards", PACKING_MODES)
    max_tokens_per_batch: int | None = option(None, "packed modes: most tokens in one packed forward (a micro-batch "
                                              "runs as several when over it); pairs over it follow length_policy; "
                                              "default: no limit beyond batch_size")
    disable_dropout: bool = option(True, "the base's dropout off, as TRL (lora_dropout is kept)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    reentrant_checkpointing: bool = option(False, "torch.utils.checkpoint's use_reentrant=True")
    fsdp: bool = option(False, "under torchrun: shard the model with FSDP2 instead of DDP")
    precision: str = option("fp32", "autocast dtype of the forward (fp16: CUDA only, with a grad scaler)", PRECISIONS)
    seed: int = option(42, "seeds adapter init, dropout and data order")
    log_every: int = option(10, "optimizer steps between log lines")
    eval_every: int | None = option(None, "optimizer steps between evaluations; always evaluated at the end")
    save_every: int | None = option(None, "optimizer steps between checkpoints; always saved at the end")
    keep_checkpoints: int = option(
        2, "how many of the latest checkpoints to keep; 1 still keeps the one before the newest, the newest being "
        "unverified until the next steps are checked")
    resume: bool = option(False, "continue from the latest checkpoint in output/checkpoints")
    init_adapter: str | None = option(
        None, "start from this saved adapter folder, with a fresh optimizer and schedule (not resume): a reward "
        "adapter (SEQ_CLS, head included; the CLI takes its LoRA settings unless flags are given), or with "
        "merge_init an SFT adapter (CAUSAL_LM)")
    merge_init: bool = option(False, "merge init_adapter, a CAUSAL_LM adapter of an SFT run, into the base first; "
                              "the reward adapter and the head then start fresh on top")
    overwrite: bool = option(False, "replace a run already in output")
    device: str | None = option(None, "torch device; default cuda if available, else cpu")
    trust_remote_code: bool = option(False, "run model code from the hub (off unless asked)")
    allow_pickle_weights: bool = option(False, "load a base that has only pickle weights (pytorch_model.bin)")
    progress: bool = option(True, "show a tqdm progress bar")
    report_to: str | list[str] = option(
        "none", "also log to these trackers, comma-separated: tensorboard (event files beside log.jsonl), wandb, "
        "mlflow; each needs its extra, e.g. pip install 'lora-rm[wandb]'")

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # read back from train_config.json
            self.lora = LoraConfig(**self.lora)
        rules = {  # field: (holds, what it must be)
            "output": (self.output.strip() != "", "a folder's name, not empty (that would mean the current folder)"),
            "batch_size": (self.batch_size >= 1, "at least 1"),
            "grad_accum": (self.grad_accum >= 1, "at least 1"),
            "lr": (self.lr > 0, "positive"),
            "head_lr": (self.head_lr is None or self.head_lr > 0, "positive (leave it unset to use lr)"),
            "max_length": (self.max_length >= 2, "at least 2"),
            "epochs": (self.epochs > 0, "positive"),
            "keep_checkpoints": (self.keep_checkpoints >= 1, "at least 1"),
            "log_every": (self.log_every >= 1, "at least 1"),
            "eval_every": (self.eval_every is None or self.eval_every >= 1, "at least 1 (unset: only at the end)"),
            "save_every": (self.save_every is None or self.save_every >= 1, "at least 1 (unset: only at the end)"),
            "max_grad_norm": (self.max_grad_norm > 0, "positive (inf turns clipping off)"),
            "weight_decay": (self.weight_decay >= 0, "at least 0"),
            "center_rewards_coefficient": (self.center_rewards_coefficient is None
                                           or self.center_rewards_coefficient >= 0, "at least 0 (unset: off)"),
            "warmup_ratio": (0 <= self.warmup_ratio < 1, "in [0, 1)"),
            "eval_fraction": (0 < self.eval_fraction < 1, "in (0, 1)"),
            "max_steps": (self.max_steps is None or self.max_steps >= 1, "at least 1"),
            "max_rows": (self.max_rows is None or self.max_rows >= 1, "at least 1"),
            "max_eval_rows": (self.max_eval_rows is None or self.max_eval_rows >= 1, "at least 1"),
            "length_policy": (self.length_policy in LENGTH_POLICIES, f"one of {LENGTH_POLICIES}"),
            "ranking_loss": (self.ranking_loss in RANKING_LOSSES, f"one of {RANKING_LOSSES}"),
            "lr_schedule": (self.lr_schedule in ("linear", "cosine"), "'linear' or 'cosine'"),
            "precision": (self.precision in PRECISIONS, f"one of {PRECISIONS}"),
            "base_dtype": (self.base_dtype in PRECISIONS, f"one of {PRECISIONS}"),
            "bnb_4bit_compute_dtype": (self.bnb_4bit_compute_dtype in PRECISIONS, f"one of {PRECISIONS}"),
            "report_to": (all(name in REPORT_TO for name in report_targets(self.report_to)),
                          f"one or more of {REPORT_TO}, comma-separated"),
            "packing": (self.packing in PACKING_MODES, f"one of {PACKING_MODES}"),
            "max_tokens_per_batch": (self.max_tokens_per_batch is None or self.max_tokens_per_batch >= 2,
                                     "at least 2 (unset: no limit)"),
        }
        check_rules(self, "TrainConfig", rules)
        if self.fsdp and self.load_in_4bit:
            raise ValueError(
                "TrainConfig: fsdp with load_in_4bit is not supported (FSDP2 does not shard bitsandbytes' packed "
                "4-bit weights); a 4-bit base fits one GPU: drop --fsdp and torchrun trains it with DDP"
            )
        weight_init = is_weight_init(self.lora.init_lora_weights)
        if weight_init and (self.load_in_4bit or self.fsdp):
            raise ValueError(
                f"TrainConfig: init_lora_weights={self.lora.init_lora_weights!r} with "
                f"{'load_in_4bit' if self.load_in_4bit else 'fsdp'} is not supported: PiSSA/OLoRA decompose the full "
                "base weight and rewrite it (a 4-bit weight would be re-quantized, an FSDP shard is not the whole "
                "weight); train on a full-precision base under one process or DDP"
            )
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio <= 0:
            raise ValueError(f"TrainConfig.loraplus_lr_ratio must be positive, got {self.loraplus_lr_ratio!r}")
        if self.load_in_4bit and self.lora.use_dora:
            raise ValueError("TrainConfig: load_in_4bit with use_dora is not supported (DoRA's row norms need the "
                             "base weight dequantized); drop one of them")
        if self.fsdp and self.lora.use_dora:
            raise ValueError(
                "TrainConfig: fsdp with use_dora is not supported (DoRA's magnitude is computed from the full base "
                "weight, which FSDP shards); drop --fsdp (torchrun then trains with DDP) or drop --use-dora"
            )
        if self.fsdp and self.packing != "none" and self.max_tokens_per_batch is not None:
            raise ValueError(
                "TrainConfig: fsdp with max_tokens_per_batch is not supported (every FSDP forward is a collective, "
                "and ranks would split their micro-batches into different numbers of packed runs); unset "
                "--max-tokens-per-batch (one packed run per micro-batch) or use DDP"
            )
        if self.packing == "none" and self.max_tokens_per_batch is not None:
            raise ValueError("TrainConfig.max_tokens_per_batch bounds packed forwards only, and TrainConfig.packing "
                             "none runs padded rows of TrainConfig.batch_size pairs whatever their length; unset "
                             "TrainConfig.max_tokens_per_batch and lower TrainConfig.batch_size to bound a forward")
        if self.resume and self.overwrite:
            raise ValueError("TrainConfig: resume and overwrite exclude each other")
        self._check_init_adapter()

    def _check_init_adapter(self) -> None:
        """init_adapter's combinations: what warm_start.py cannot do is refused before anything loads."""
        if self.merge_init and not self.init_adapter:
            raise ValueError("TrainConfig.merge_init needs TrainConfig.init_adapter: the SFT (CAUSAL_LM) "
                             "adapter's folder")
        if self.init_adapter and self.fsdp:
            raise ValueError("TrainConfig.init_adapter with TrainConfig.fsdp is not supported (the base loads "
                             "sharded, after the adapter is applied); drop --fsdp (torchrun then trains with DDP)")
        if self.merge_init and self.load_in_4bit:
            raise ValueError("TrainConfig.merge_init with TrainConfig.load_in_4bit is not supported (merging into "
                             "4-bit weights would round the SFT update away); merge on a full-precision base")
        if self.init_adapter:  # absolute: a --resume from another working folder finds it again
            self.init_adapter = str(Path(self.init_adapter).expanduser().resolve())
        if self.init_adapter and self.overwrite and Path(self.output).resolve() in (
                Path(self.init_adapter), *Path(self.init_adapter).parents):
            raise ValueError("TrainConfig.overwrite would delete TrainConfig.init_adapter, which is inside "
                             "TrainConfig.output: start from a copy of it, or write to another --output")
        if self.init_adapter and not self.merge_init and is_weight_init(self.lora.init_lora_weights):
            raise ValueError(f"LoraConfig.init_lora_weights={self.lora.init_lora_weights!r} with "
                             "TrainConfig.init_adapter: the adapter's weights replace any init; leave it at True")


@dataclass
class ServeConfig:
    """`lora-rm serve` beyond the loading flags it shares with score: where it listens, how it batches, its limits."""

    host: str = option("127.0.0.1", "address to bind; loopback by default (anything else warns without an api key)")
    port: int = option(8000, "port to bind; 0 picks a free one (the URL is printed)")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on every endpoint but /health; default: "
                                 "$LORA_RM_API_KEY (prefer it: a flag shows in ps)")
    max_batch_size: int = option(64, "most texts in one forward")
    max_batch_tokens: int = option(16384, "most tokens in one forward, counted padded (texts x longest); a text "
                                   "longer than this runs alone")
    batch_wait_ms: float = option(5.0, "how long a text waits for companions before its batch runs")
    max_request_texts: int = option(4096, "most texts in one request (more: 413)")
    max_request_mb: float = option(64.0, "largest request body in MiB (larger: 413)")
    normalize: bool = option(False, "return (reward - mean) / std with the mean and std of the --adapter run "
                             "folder's reward_stats.json (written by lora-rm train)")

    def __post_init__(self) -> None:
        rules = {  # field: (holds, what it must be)
            "port": (0 <= self.port <= 65535, "in [0, 65535]"),
            "max_batch_size": (self.max_batch_size >= 1, "at least 1"),
            "max_batch_tokens": (self.max_batch_tokens >= 1, "at least 1"),
            "batch_wait_ms": (self.batch_wait_ms >= 0, "at least 0"),
            "max_request_texts": (self.max_request_texts >= 1, "at least 1"),
            "max_request_mb": (self.max_request_mb > 0, "positive"),
            "api_key": (self.api_key is None or self.api_key.strip() != "", "non-empty (unset: no key)"),
        }
        check_rules(self, "ServeConfig", rules)
