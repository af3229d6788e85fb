"""Loading a base model and its tokenizer, and the dtypes they run in: what training, evaluation and scoring share.

A base loads as a one-label AutoModelForSequenceClassification in its storage dtype (nf4 linear layers with
load_in_4bit), from safetensors only unless the user allows pickles; the tokenizer gets a pad token. A saved
adapter loads on top (load_reward_model). save_tokenizer writes the tokenizer a trained or merged model is served
with, so that plain transformers encodes texts as training did. Nothing here scores or trains.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from . import encode
from .adapter_io import load_adapter, read_adapter_config
from .atomic import current_umask
from .builtin import builtin_model, builtin_tokenizer
from .config import BUILTIN, DTYPES
from .qlora import prepare_4bit_model, quantization_config


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
    message = ensure_pad_token(tokenizer, model)
    if message:
        print(message)
    return model, tokenizer


def default_device(device: str | torch.device | None) -> str | torch.device:
    """The device asked for (returned as given), else "cuda" when there is one, else "cpu"."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_pretrained(
    name: str, dtype: torch.dtype, load_in_4bit: bool = False, compute_dtype: str = "bf16", device=None,
    trust_remote_code: bool = False, allow_pickle_weights: bool = False,
) -> nn.Module:
    """from_pretrained with one output, safetensors only unless allowed; with load_in_4bit, nf4 linear layers
    placed on `device` while loading (a 4-bit model is not moved afterwards)."""
    options = dict(num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code,
                   use_safetensors=None if allow_pickle_weights else True)
    if load_in_4bit:
        device = torch.device(default_device(device))
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
        prepare_4bit_model(model)
    return model


def load_reward_model(model_name: str, adapter: str | Path | None, **load_options):
    """Base model (load_model_and_tokenizer's options) + saved adapter, in eval mode: (model, tokenizer).

    The adapter's config is read first: a wrong --adapter fails in a second, not after loading a large base.
    adapter None: the model as it is (a stock one-label reward model, or a merged one).
    """
    if adapter is not None:
        check_adapter_base(model_name, adapter, read_adapter_config(adapter).base_model_name_or_path)
    model, tokenizer = load_model_and_tokenizer(model_name, **load_options)
    if adapter is None:
        check_trained_head(model_name, model)
    return (model if adapter is None else load_adapter(model, adapter)).eval(), tokenizer


def check_trained_head(name: str, model: PreTrainedModel) -> None:
    """Scored as it is, a checkpoint saved without a sequence-classification head would get a random one."""
    saved = getattr(model.config, "architectures", None) or []
    if not any(architecture.endswith("ForSequenceClassification") for architecture in saved):
        raise ValueError(f"{name} is saved as {', '.join(saved) or 'no architecture'}, not as a "
                         "*ForSequenceClassification: without --adapter its reward head would be drawn at random; give "
                         "the adapter trained on it, or a reward model")


def same_base(saved: str, model: str) -> bool:
    """Whether the base an adapter names is --model: the same text, or two paths to one local folder."""
    if saved.rstrip("/") == model.rstrip("/"):
        return True
    a, b = Path(saved).expanduser(), Path(model).expanduser()
    return a.is_dir() and b.is_dir() and a.resolve() == b.resolve()


def check_adapter_base(model_name: str, adapter: str | Path, saved_base: str | None) -> None:
    """Refuse the built-in base for an adapter its config says was trained on another (--model forgotten), and
    warn when --model names another base than the one saved: the adapter may still fit, but was not trained there."""
    if not saved_base or same_base(saved_base, model_name):
        return
    if model_name == BUILTIN:
        raise ValueError(f"{adapter} was trained on {saved_base!r} (its adapter_config.json's base_model_name_or_path)"
                         f", but the model is the built-in one (the default without --model): add --model {saved_base}")
    warnings.warn(f"{adapter} was trained on {saved_base!r} (its adapter_config.json), not on {model_name!r}; "
                  "loading it there anyway", stacklevel=3)


def _post_processor_with_eos(tokenizer) -> Any | None:
    """The tokenizer's post-processor with EOS right after the text, or None to leave it alone."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    eos = tokenizer.eos_token
    if eos is None or backend is None:  # BERT: [SEP] already closes the text; a slow tokenizer keeps its rules
        return None
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
    """Save the tokenizer so that plain `tokenizer(text)` encodes as training did, EOS included (encode.encode_text).

    Whoever serves a merged model calls AutoTokenizer(folder)(text); without the EOS that training appended, the
    reward is read at another token and can rank a pair backwards. tokenizer_config.json then carries
    encode.APPENDS_EOS, so encode_text does not add a second EOS to texts encoded with the saved tokenizer.
    """
    serving = copy.deepcopy(tokenizer)
    new = _post_processor_with_eos(serving)
    if new is not None:
        serving.backend_tokenizer.post_processor = new
        probes = ["What is 1 + 2 ? 3", "Hello world", "a"]
        if all(serving(text)["input_ids"] == tokenizer(text + tokenizer.eos_token)["input_ids"] for text in probes):
            serving.init_kwargs[encode.APPENDS_EOS] = True
        else:
            print(f"note: the tokenizer saved to {folder} does not append EOS by itself; encode texts with "
                  "lora_rm.encode.encode_text to score them as training did")
            serving = tokenizer
    serving.save_pretrained(folder)


# What a merged model's folder holds (save_pretrained + save_tokenizer); a merge replaces a folder of only these.
MERGED_FILES = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
                "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.*", "vocab.*",
                "merges.txt", "*.model", "README.md")


def check_merge_output(output: Path, adapter: Path) -> None:
    """Refuse an --output a merge would lose data in: a file, the adapter's folder, a folder of other files."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"merge --output {output} is a file; give a folder for the merged model")
    if output.resolve() == adapter.resolve():
        raise ValueError(f"merge --output {output} is the adapter's own folder; give another folder")
    if output.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise ValueError(f"merge --output {output} is the current folder or one of its parents; give a new folder")
    if output.is_dir():
        foreign = sorted(path.name for path in output.iterdir()
                         if path.is_dir() or not any(fnmatch.fnmatch(path.name, kind) for kind in MERGED_FILES))
        if foreign:
            named = f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}"
            raise ValueError(f"merge --output {output} holds files that are not a merged model's ({named}); "
                             "give a new or empty folder")


def save_merged(model: PreTrainedModel, tokenizer, output: Path) -> None:
    """Write the merged model and tokenizer to a new folder beside output, then swap it in.

    No file of an older merge survives (a stale chat_template.jinja would change how texts are encoded), a crash
    leaves the old folder whole, and the files follow the umask (save_pretrained writes model.safetensors 0600).
    """
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(f"the merged weights hold NaN or inf (first: {bad[0]}): the adapter is not finite, e.g. "
                         f"saved from a diverged run; nothing was written to {output}")
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        model.save_pretrained(staging)
        save_tokenizer(tokenizer, staging)
        for path in staging.iterdir():
            os.chmod(path, 0o666 & ~current_umask())
        os.chmod(staging, 0o777 & ~current_umask())
        previous = output.with_name(f".{output.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)  # left by a merge stopped while it deleted the old model
        if output.exists():
            os.replace(output, previous)
        os.replace(staging, output)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def autocast_context(precision: str, device: torch.device):
    """bf16/fp16 autocast (the loss itself is computed in fp32 by bradley_terry_loss)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> str | None:
    """Give tokenizer (EOS, else UNK) and model.config a pad token: the head needs it to find the last token.

    Returns what was changed, for the CLI to print, or None when nothing was.
    """
    changes = []
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            raise ValueError("the tokenizer has no pad, eos or unk token; set tokenizer.pad_token yourself")
        tokenizer.pad_token = fallback
        changes.append(f"tokenizer had no pad token, using {fallback!r} (id {tokenizer.pad_token_id})")
        if fallback == tokenizer.eos_token:
            changes.append("pad == EOS, so the reward is read at the token before the final EOS, as in TRL")
    if model is not None:
        text_config = model.config.get_text_config()
        if text_config.pad_token_id != tokenizer.pad_token_id:
            changes.append(f"model pad_token_id {text_config.pad_token_id} -> {tokenizer.pad_token_id}")
            text_config.pad_token_id = tokenizer.pad_token_id
    return "; ".join(changes) or None
