"""The README.md model card of every folder `train` and `merge` write, in the hub's format, and `lora-rm push`.

A card is YAML metadata the hub reads (base_model, library_name, tags, datasets: hub ids only, never a local path),
then what a user of the folder needs: the command that made it, the eval accuracy beside the length-only baselines
with their intervals, reward_stats for normalising, how to load it (PEFT, lora-rm, merged with plain transformers)
and where lora-rm differs from PEFT. Its numbers are those of the run's eval_metrics.json and reward_stats.json.

The adapter folder's library is PEFT (PeftModel.from_pretrained loads it), the merged folder's transformers.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from .adapter_io import CONFIG_NAME, WEIGHTS_NAME
from .atomic import atomic_path
from .config import BUILTIN, TrainConfig
from .eval_stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE

CARD_NAME = "README.md"
TAGS = ["reward-model", "lora-rm", "lora"]  # an adapter folder adds "peft"
# What `lora-rm push` uploads: the weights, configs, tokenizer, card and the run's small JSON files and log; never
# checkpoints/ (optimizer and RNG state for --resume), TensorBoard events, the report's PNGs or hidden files.
PUSHED = ("README.md", WEIGHTS_NAME, CONFIG_NAME, "config.json", "model.safetensors", "model-*.safetensors",
          "model.safetensors.index.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
          "added_tokens.json", "chat_template.*", "vocab.*", "merges.txt", "*.model", "train_config.json",
          "eval_metrics.json", "reward_stats.json", "log.jsonl")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as a shell line: `lora-rm ...` under the CLI (or torchrun -m lora_rm), else the
    Python command."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0])
    if program.name == "lora-rm" or (program.parent.name == "lora_rm" and program.name in ("__main__.py", "cli.py")):
        return shlex.join(["lora-rm", *argv[1:]])
    return shlex.join(["python", *argv])


def hub_id(name: str | None) -> str | None:
    """name when it reads as a hub id (owner/name) and is no local path, else None."""
    if name is None or name == BUILTIN or Path(name).exists() or not HUB_ID.fullmatch(name):
        return None
    return name


def front_matter(base: str | None, library: str, datasets: list[str | None]) -> str:
    """The YAML block between --- lines, written by huggingface_hub as the hub reads it; local names left out."""
    from huggingface_hub import ModelCardData

    tags = [*TAGS, "peft"] if library == "peft" else TAGS
    hub_datasets = list(dict.fromkeys(name for name in map(hub_id, datasets) if name))
    data = ModelCardData(base_model=hub_id(base), library_name=library, pipeline_tag="text-classification",
                         tags=tags, datasets=hub_datasets or None)
    return f"---\n{data.to_yaml()}\n---\n"


def number(value: Any) -> str:
    """A metric as the card prints it: 4 decimals, n/a when absent."""
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def interval(metrics: dict[str, Any], key: str) -> str:
    """The bootstrap interval of metrics[key] as [low, high]."""
    low_high = metrics.get(f"{key}_ci")
    return f"[{number(low_high[0])}, {number(low_high[1])}]" if low_high else "n/a"


def metrics_table(metrics: dict[str, Any]) -> str:
    """One eval set's numbers: pairs (the model beside the length-only rules) or K-way rows."""
    if "top1_accuracy" in metrics:  # K-way rows (ranking.py)
        names = ("top1_accuracy", "pairwise_accuracy", "kendall_tau", "n_rows", "n_pairs")
        return "\n".join(f"- `{name}`: {number(metrics.get(name))}" for name in names) + "\n"
    rows = [("this reward model", "accuracy"), ("the longer side wins", "longer_wins_accuracy"),
            ("the shorter side wins", "shorter_wins_accuracy")]
    table = f"| rule | accuracy | {CONFIDENCE:.0%} interval |\n|---|---|---|\n" + "".join(
        f"| {label} | {number(metrics.get(key))} | {interval(metrics, key)} |\n" for label, key in rows)
    ties, length_ties = number(metrics.get("tie_rate")), number(metrics.get("length_tie_rate"))
    return (f"{table}\n{metrics['n_pairs']} pairs; reward ties {ties}, length ties {length_ties}, "
            f"mean margin {number(metrics.get('mean_margin'))}.\n")


def evaluation_section(metrics: dict[str, Any] | None, eval_data: str, source: str) -> str:
    """The final accuracy of each eval set beside the length-only rules, with intervals."""
    if not metrics:
        return "## Evaluation\n\nNo lora-rm evaluation was found beside the adapter.\n"
    sets = metrics.get("eval_datasets") or {None: metrics}
    text = [f"## Evaluation\n\nAt the end of training, on {eval_data} ({source}). Accuracy counts chosen strictly "
            "above rejected (ties apart); the length-only rules are scored on the same pairs, lengths in tokens as "
            f"scored; {CONFIDENCE:.0%} percentile-bootstrap intervals ({BOOTSTRAP_RESAMPLES:,} resamples, seed "
            f"{BOOTSTRAP_SEED}).\n"]
    for name, numbers in sets.items():
        text.append(f"### {name}\n\n{metrics_table(numbers)}" if name else metrics_table(numbers))
    return "\n".join(text)


def normalising_section(stats: dict[str, Any] | None) -> str:
    """reward_stats: the mean and std a policy trainer normalises rewards with."""
    if not stats:
        return ""
    return (f"## Normalising rewards\n\nOn the eval pairs (both sides) the rewards have mean {stats['mean']!r} and "
            f"std {stats['std']!r} (`reward_stats.json`); a policy trainer normalises with `(reward - mean) / "
            "std`.\n")


def base_lines(base: str) -> str:
    """Python that builds the base classifier as `base` (the built-in demo model has no hub id)."""
    if base == BUILTIN:
        return ("from lora_rm.builtin import builtin_model, builtin_tokenizer\n"
                "base = builtin_model(builtin_tokenizer())  # the built-in demo base\n")
    return (f"base = AutoModelForSequenceClassification.from_pretrained({json.dumps(base)}, num_labels=1, "
            "dtype=torch.float32)\n")


def adapter_loading(base: str) -> str:
    """Loading a trained folder three ways: PEFT, lora-rm, merged into plain transformers."""
    return f"""## Loading

`ADAPTER` is this folder (from the hub: `huggingface_hub.snapshot_download(REPO_ID)`).

With PEFT:

```python
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(ADAPTER)  # appends the EOS training appended
{base_lines(base)}base.config.pad_token_id = tokenizer.pad_token_id  # the reward is read at the last non-pad token
model = PeftModel.from_pretrained(base, ADAPTER).eval()
with torch.no_grad():
    reward = model(**tokenizer("a conversation", return_tensors="pt")).logits[0, 0].item()
```

With lora-rm: `lora-rm score --model {shlex.quote(base)} --adapter ADAPTER --input texts.jsonl`, or

```python
from lora_rm.evaluate import score_texts
from lora_rm.model_io import load_reward_model

model, tokenizer = load_reward_model({json.dumps(base)}, ADAPTER)
rewards = score_texts(model, tokenizer, ["a conversation", "another one"])
```

Merged into the base, with plain transformers:

```bash
lora-rm merge --model {shlex.quote(base)} --adapter ADAPTER --output merged
```

```python
model = AutoModelForSequenceClassification.from_pretrained("merged")
tokenizer = AutoTokenizer.from_pretrained("merged")
```
"""


def merged_loading(adapter: Path, base: str) -> str:
    """Loading a merged folder with plain transformers."""
    score = shlex.join(["lora-rm", "score", "--model", base, "--adapter", str(adapter)])
    return f"""## Loading

A plain transformers model (`MODEL` is this folder, or its hub id); no PEFT or lora-rm needed:

```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = AutoModelForSequenceClassification.from_pretrained(MODEL, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(MODEL)  # appends the EOS training appended
with torch.no_grad():
    reward = model(**tokenizer("a conversation", return_tensors="pt")).logits[0, 0].item()
```

lora-rm scores with the adapter it was merged from (`{score}`); the merged model gives the same rewards up to
rounding.
"""


DIFFERENCES = """## Differences from PEFT that matter

- The score head is trained in full, outside the low-rank update, and in fp32 even on a bf16 or 4-bit base (PEFT
  trains it in the base dtype). It is saved under PEFT's `modules_to_save` keys, so PEFT loads it as its trained
  copy of the head; loaded into a half-precision base it is cast to that dtype, and the rewards move by rounding.
- The reward is read at the last token that is not padding. When the base has no pad token, pad = EOS: the reward
  is then read at the token before the final EOS. Encode with this folder's tokenizer, which appends that EOS.
- The adapter is PEFT's format (`adapter_config.json`, `adapter_model.safetensors`, task SEQ_CLS); lora-rm was
  checked against PEFT and TRL for rewards, gradients, merged weights and saved adapters.
"""


def made_by_section(command: str) -> str:
    """The command that made the folder (and the number of processes under torchrun)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    under = f"\nRun under torchrun, {processes} processes.\n" if processes > 1 else ""
    return f"## How it was made\n\n```bash\n{command}\n```\n{under}"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file of the run, or None when the folder has none (a PEFT adapter merged by lora-rm)."""
    return json.loads(path.read_text()) if path.is_file() else None


def eval_data_of(config: TrainConfig) -> str:
    """Which rows the final evaluation scored, in words."""
    if config.eval_dataset is None:
        return f"the held-out last {config.eval_fraction:g} of `{config.dataset}`'s training rows"
    names = [config.eval_dataset] if isinstance(config.eval_dataset, str) else config.eval_dataset
    return ", ".join(f"`{name}` ({config.eval_split})" for name in names)


def dataset_names(settings: dict[str, Any]) -> list[str | None]:
    """The training and eval datasets of a run's settings (eval_dataset: one name, a list or None)."""
    evals = settings.get("eval_dataset") or []
    return [settings.get("dataset"), *([evals] if isinstance(evals, str) else evals)]


def write_card(folder: Path, metadata: str, title: str, sections: list[str]) -> None:
    """README.md: the metadata, a title line, then the sections, written atomically."""
    with atomic_path(folder / CARD_NAME) as tmp:
        Path(tmp).write_text(metadata + f"# {folder.name}: {title}\n\n" + "\n".join(s for s in sections if s))


def write_adapter_card(output: Path, config: TrainConfig) -> None:
    """The trained folder's card, from its eval_metrics.json and reward_stats.json (written just before)."""
    intro = (f"Trained with lora-rm on `{config.dataset}`: a LoRA adapter and a fully trained score head, fit with the "
             "Bradley-Terry loss on preference pairs; one scalar reward per text. Every setting is in "
             "`train_config.json`, every logged step in `log.jsonl`.\n")
    metrics = read_json(output / "eval_metrics.json")
    write_card(output, front_matter(config.model, "peft", dataset_names(vars(config))),
               f"a LoRA reward model of {config.model}", [
                   intro, made_by_section(command_line()),
                   evaluation_section(metrics, eval_data_of(config), "`eval_metrics.json`"),
                   normalising_section(read_json(output / "reward_stats.json")), adapter_loading(config.model),
                   DIFFERENCES])


def write_merged_card(output: Path, adapter: Path, base: str) -> None:
    """The merged folder's card; the numbers are the adapter folder's, measured before merging."""
    intro = (f"The adapter `{adapter}` folded into its base by `lora-rm merge`: a plain "
             "`AutoModelForSequenceClassification` with one output, the reward.\n")
    metrics = read_json(adapter / "eval_metrics.json")
    source = f"`{adapter / 'eval_metrics.json'}`, measured with the adapter before merging"
    datasets = dataset_names(read_json(adapter / "train_config.json") or {})
    write_card(output, front_matter(base, "transformers", datasets), f"a reward model of {base}, its adapter merged", [
        intro, made_by_section(command_line()), evaluation_section(metrics, "the adapter's eval data", source),
        normalising_section(read_json(adapter / "reward_stats.json")), merged_loading(adapter, base), DIFFERENCES])


def files_to_push(folder: Path) -> list[str]:
    """The top-level files of a lora-rm folder that `push` uploads (PUSHED); a folder that is not one is refused."""
    weights = [(CONFIG_NAME, WEIGHTS_NAME), ("config.json", "model.safetensors"),
               ("config.json", "model.safetensors.index.json")]
    card = folder / CARD_NAME
    is_lora_rm = card.is_file() and "lora-rm" in (card_metadata(card.read_text()).get("tags") or [])
    if not folder.is_dir() or not is_lora_rm or not any((folder / a).is_file() and (folder / b).is_file()
                                                         for a, b in weights):
        raise ValueError(f"{folder} is not a lora-rm adapter or merged folder (one that `lora-rm train` or `lora-rm "
                         "merge` wrote: weights, their config and a README.md card tagged lora-rm)")
    return sorted(path.name for path in folder.iterdir()
                  if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in PUSHED))


def card_metadata(text: str) -> dict[str, Any]:
    """The YAML metadata of a card's text, as the hub parses it ({} without any)."""
    from huggingface_hub import ModelCard

    return ModelCard(text, ignore_metadata_errors=True).data.to_dict()


def push(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create the hub repo (kept if it exists) and upload the folder's files_to_push in one commit; its URL."""
    from huggingface_hub import HfApi

    files = files_to_push(folder)
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=files,
                      commit_message=f"Upload {folder.name} with lora-rm push")
    return str(url)
