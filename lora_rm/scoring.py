"""Loading a reward model and scoring with it: what `lora-rm eval`, `score`, `merge` and the trainer share.

The reward of a text is the score head's output at its last real token (lora_rm/data.py says which token
that is). Pairs are scored in one forward: chosen rows first, then rejected rows, padded right as TRL does.
save_tokenizer writes the tokenizer a trained or merged model is served with, so that plain transformers encodes
texts as training did.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from . import data, ranking
from .adapter_io import load_adapter, read_adapter_config
from .config import BUILTIN, DTYPES
from .eval_stats import pair_report
from .loss import preference_metrics, reward_stats, split_rewards


def torch_dtype(name: str) -> torch.dtype:
    """torch.float32 for "fp32", and so on (config.DTYPES)."""
    return getattr(torch, DTYPES[name])


def check_model_source(name: str) -> None:
    """Fail before loading when --model names a local folder that is not a Hugging Face model folder."""
    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {name} is a folder without config.json: not a Hugging Face model folder "
            "(save one with model.save_pretrained and tokenizer.save_pretrained, or give a hub id)"
        )
    if not path.exists() and name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--model {name}: no such folder")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer of a hub id or model folder, after checking the folder is a model folder."""
    from transformers import AutoTokenizer

    check_model_source(name)
    return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)


def load_model_and_tokenizer(
    name: str,
    trust_remote_code: bool = False,
    base_dtype: str = "fp32",
    load_in_4bit: bool = False,
    bnb_4bit_compute_dtype: str = "bf16",
    device: str | torch.device | None = None,
    allow_pickle_weights: bool = False,
):
    """A (model, tokenizer) pair with a pad token on both; "builtin" builds the same tiny offline model each time.

    The base is stored in base_dtype (its linear layers in nf4 with load_in_4bit, on `device`); what trains
    (adapter and head) is kept fp32 by add_lora. Weights load from safetensors only unless allow_pickle_weights:
    a pytorch_model.bin is a pickle, which can run code when it is read.
    """
    dtype = torch_dtype(base_dtype)
    if name == BUILTIN:
        from .builtin import builtin_model, builtin_tokenizer

        tokenizer = builtin_tokenizer()
        model = builtin_model(tokenizer).to(dtype)
        if not load_in_4bit:
            return model, tokenizer
        with tempfile.TemporaryDirectory() as folder:  # quantization happens while loading: go through a folder
            # Not model.save_pretrained: under torch.distributed it writes on rank 0 only, and each rank needs one.
            model.config.save_pretrained(folder)
            safetensors.torch.save_model(model, f"{folder}/model.safetensors", metadata={"format": "pt"})
            return load_pretrained(folder, dtype, True, bnb_4bit_compute_dtype, device), tokenizer
    tokenizer = load_tokenizer(name, trust_remote_code)
    model = load_pretrained(name, dtype, load_in_4bit, bnb_4bit_compute_dtype, device, trust_remote_code,
                            allow_pickle_weights)
    message = data.ensure_pad_token(tokenizer, model)
    if message:
        print(message)
    return model, tokenizer


def load_pretrained(
    name: str, dtype: torch.dtype, load_in_4bit: bool = False, compute_dtype: str = "bf16", device=None,
    trust_remote_code: bool = False, allow_pickle_weights: bool = False,
) -> nn.Module:
    """from_pretrained with one output, safetensors only unless allowed; with load_in_4bit, nf4 linear layers
    placed on `device` while loading (a 4-bit model is not moved afterwards)."""
    from transformers import AutoModelForSequenceClassification

    options = dict(num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code,
                   use_safetensors=None if allow_pickle_weights else True)
    if load_in_4bit:
        from .qlora import quantization_config

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        options.update(quantization_config=quantization_config(torch_dtype(compute_dtype)), device_map={"": device})
    try:
        model = AutoModelForSequenceClassification.from_pretrained(name, **options)
    except OSError as error:
        if allow_pickle_weights or "safetensors" not in str(error):
            raise
        raise OSError(
            f"{name} has no model.safetensors ({error}); lora-rm loads weights with safetensors only. Convert the "
            "pickle weights (pytorch_model.bin) to safetensors, or pass --allow-pickle-weights if you trust them"
        ) from error
    if load_in_4bit:
        from .qlora import prepare_4bit_model

        prepare_4bit_model(model)
    return model


def load_reward_model(model_name: str, adapter: str | Path, **load_options):
    """Base model (load_model_and_tokenizer's options) + saved adapter, in eval mode: (model, tokenizer).

    The adapter's config is read first: a wrong --adapter fails in a second, not after loading a large base.
    """
    read_adapter_config(adapter)
    model, tokenizer = load_model_and_tokenizer(model_name, **load_options)
    return load_adapter(model, adapter).eval(), tokenizer


def _post_processor_with_eos(tokenizer) -> Any | None:
    """The tokenizer's post-processor with EOS right after the text, or None to leave it alone."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    eos = tokenizer.eos_token
    if eos is None or backend is None:  # BERT: [SEP] already closes the text; a slow tokenizer keeps its rules
        return None
    from tokenizers import Tokenizer

    state = json.loads(backend.to_str())
    old = state["post_processor"]
    eos_piece = {"SpecialToken": {"id": eos, "type_id": 0}}
    eos_special = {eos: {"id": eos, "ids": [tokenizer.eos_token_id], "tokens": [eos]}}
    if old and old["type"] == "TemplateProcessing":  # Llama & co: keep BOS and the rest, EOS after $A
        single = []
        for piece in old["single"]:
            single.append(piece)
            if piece.get("Sequence", {}).get("id") == "A":
                single.append({"SpecialToken": {"id": eos, "type_id": piece["Sequence"]["type_id"]}})
        new = {**old, "single": single, "special_tokens": {**old["special_tokens"], **eos_special}}
    else:  # ByteLevel (GPT-2, Qwen), RoBERTa's <s> $A </s>, none: EOS after whatever they add
        sequence = [{"Sequence": {"id": name, "type_id": 0}} for name in ("A", "B")]
        appended = {"type": "TemplateProcessing", "single": [sequence[0], eos_piece], "pair": sequence,
                    "special_tokens": eos_special}
        new = appended if old is None else {"type": "Sequence", "processors": [old, appended]}
    return Tokenizer.from_str(json.dumps({**state, "post_processor": new})).post_processor


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """Save the tokenizer so that plain `tokenizer(text)` encodes as training did, EOS included (data.encode_text).

    Whoever serves a merged model calls AutoTokenizer(folder)(text); without the EOS that training appended, the
    reward is read at another token and can rank a pair backwards. tokenizer_config.json then carries
    data.APPENDS_EOS, so encode_text does not add a second EOS to texts encoded with the saved tokenizer.
    """
    serving = copy.deepcopy(tokenizer)
    new = _post_processor_with_eos(serving)
    if new is not None:
        serving.backend_tokenizer.post_processor = new
        probes = ["What is 1 + 2 ? 3", "Hello world", "a"]
        if all(serving(text)["input_ids"] == tokenizer(text + tokenizer.eos_token)["input_ids"] for text in probes):
            serving.init_kwargs[data.APPENDS_EOS] = True
        else:
            print(f"note: the tokenizer saved to {folder} does not append EOS by itself; encode texts with "
                  "lora_rm.data.encode_text to score them as training did")
            serving = tokenizer
    serving.save_pretrained(folder)


def pair_collator(tokenizer) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """collate_pairs bound to this tokenizer's pad id."""
    return functools.partial(data.collate_pairs, pad_token_id=tokenizer.pad_token_id)


def autocast_context(precision: str, device: torch.device):
    """bf16/fp16 autocast (the loss itself is computed in fp32 by bradley_terry_loss)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def batch_rewards(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over chosen rows then rejected rows; the reward is read at each row's last real token."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return split_rewards(logits.float())  # (2B, 1) -> (B,), (B,)


@torch.no_grad()
def rewards_for_pairs(model, pairs, collator, batch_size: int, device, precision: str = "fp32",
                      packing: str = "none", max_tokens_per_batch: int | None = None, pad_token_id: int | None = None):
    """(chosen, rejected) rewards of every pair, in order, as two CPU fp32 tensors.

    packing is a resolved mode (packing.resolve_packing); packed modes need the tokenizer's pad_token_id.
    """
    from .packing import pair_rewards

    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        with autocast_context(precision, device):
            if packing == "none":
                batch = {k: v.to(device) for k, v in collator(pairs[start : start + batch_size]).items()}
                rewards_chosen, rewards_rejected = batch_rewards(model, batch)
            else:
                rewards_chosen, rewards_rejected = pair_rewards(
                    model, model, pairs[start : start + batch_size], packing, max_tokens_per_batch, pad_token_id,
                    device)
        chosen.append(rewards_chosen.cpu())
        rejected.append(rewards_rejected.cpu())
    model.train(was_training)
    if not chosen:  # a rank whose eval shard is empty
        return torch.empty(0), torch.empty(0)
    return torch.cat(chosen), torch.cat(rejected)


def eval_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, Any]:
    """Preference metrics plus the reward mean/std a policy trainer normalises with."""
    return {
        **preference_metrics(chosen, rejected),
        "n_pairs": len(chosen),
        "reward_stats": reward_stats(torch.cat([chosen, rejected])),
    }


def evaluate_dataset(
    model, tokenizer, dataset, max_length: int | None, length_policy: str = "drop", skip_bad_rows: bool = False,
    batch_size: int = 8, report: str | Path | None = None, log: str | Path | None = None,
    sections: dict[str, list[str]] | None = None, packing: str = "auto", max_tokens_per_batch: int | None = None,
) -> tuple[dict[str, Any], data.DataStats, list[Path]]:
    """Tokenize preference rows, score them and optionally write the reward report: (metrics, stats, report files).

    The metrics carry eval_stats.pair_report's length-only baselines and intervals; per subset, macro and per
    section when the rows have a `subset` column (sections: {section: [subsets]}).
    """
    from .packing import fit_pairs_to_budget, resolve_packing

    if sections and "subset" not in dataset.column_names:
        raise ValueError(f"--sections needs a 'subset' column in the data; it has {dataset.column_names}")
    tokenized, stats = data.tokenize_pairs(dataset, tokenizer, max_length, length_policy, skip_bad_rows)
    pairs = tokenized.to_list()
    device = next(model.parameters()).device
    if ranking.is_ranking_rows(pairs):  # K-way rows: top-1, pairwise accuracy, Kendall's tau
        if packing not in ("none", "auto"):
            raise ValueError(f"--packing {packing} is not supported with K-way rows yet; use --packing none")
        metrics, written = ranking.evaluate_ranking_rows(model, tokenizer, pairs, batch_size, device, report, log)
        return metrics, stats, written
    mode = resolve_packing(packing, model)
    pairs, over_budget = fit_pairs_to_budget(pairs, mode, max_tokens_per_batch, length_policy)
    if over_budget:
        print(f"{over_budget} pairs over --max-tokens-per-batch {max_tokens_per_batch}: {length_policy}")
    chosen, rejected = rewards_for_pairs(model, pairs, pair_collator(tokenizer), batch_size, device,
                                         packing=mode, max_tokens_per_batch=max_tokens_per_batch,
                                         pad_token_id=tokenizer.pad_token_id)
    metrics = eval_metrics(chosen, rejected)
    lengths_chosen = [len(pair["chosen_ids"]) for pair in pairs]
    lengths_rejected = [len(pair["rejected_ids"]) for pair in pairs]
    subsets = [pair["subset"] for pair in pairs] if "subset" in tokenized.column_names else None
    full_chosen, full_rejected = lengths_chosen, lengths_rejected
    if stats.n_truncated:  # the length-only rules compare whole sides: cut to max_length, both would often tie
        full, _ = data.tokenize_pairs(dataset, tokenizer, None, length_policy, skip_bad_rows)  # the same rows kept
        full_chosen = [len(ids) for ids in full["chosen_ids"]]
        full_rejected = [len(ids) for ids in full["rejected_ids"]]
    metrics.update(pair_report(chosen, rejected, full_chosen, full_rejected, subsets, sections))
    written = []
    if report:
        from .plots import write_report  # matplotlib is optional

        written = write_report(report, chosen, rejected, lengths_chosen, lengths_rejected, metrics, log)
    return metrics, stats, written


@torch.no_grad()
def score_texts(model, tokenizer, items: list, max_length: int | None = None, batch_size: int = 8,
                packing: str = "auto") -> list[float]:
    """One reward per text (or chat), encoded exactly as training encoded each side (EOS included).

    Any packing mode but none scores the texts padding-free (texts share no prompt).
    """
    from . import packing as packing_module

    mode = packing_module.resolve_packing(packing, model, lambda message: None)
    device = next(model.parameters()).device
    rewards = []
    for start in range(0, len(items), batch_size):
        sides = [data.encode_text(tokenizer, None, item) for item in items[start : start + batch_size]]
        too_long = [start + i for i, ids in enumerate(sides) if max_length and len(ids) > max_length]
        if too_long:
            raise ValueError(f"texts {too_long} are longer than max_length={max_length} tokens")
        if mode != "none":
            packed = packing_module.pack_groups([[ids] for ids in sides], tokenizer.pad_token_id, False,
                                                packing_module.is_encoder(model))
            rewards.extend(packing_module.packed_rewards(model, model, packed, device).tolist())
            continue
        input_ids, attention_mask = data.pad_sequences(sides, tokenizer.pad_token_id, "right")
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
        rewards.extend(logits.squeeze(-1).float().tolist())
    return rewards
