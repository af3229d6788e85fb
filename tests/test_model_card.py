"""Model cards and `lora-rm push`: every folder train and merge write has a README.md in the hub's format that
renders its own run's numbers and whose loading code runs; push uploads the folder's files (never checkpoints/)
through a mocked hub API, and PEFT loads what would be uploaded."""

import json
import re
import shlex
import shutil
import sys

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoTokenizer

from lora_rm.builtin import builtin_model, builtin_tokenizer
from lora_rm.cli import main as cli_main
from lora_rm.evaluate import score_texts
from lora_rm.model_card import command_line, front_matter
from lora_rm.model_io import load_reward_model

TRAIN = ["train", "--max-rows", "120", "--max-steps", "3", "--max-length", "32", "--lora-r", "4", "--save-every",
         "2", "--report-to", "tensorboard", "--no-progress"]


def run_cli(monkeypatch, *args: str) -> str:
    """Run `lora-rm ARGS` in this process, with sys.argv as the console script would see it; the command line."""
    argv = ["/usr/local/bin/lora-rm", *args]
    monkeypatch.setattr(sys, "argv", argv)
    cli_main(list(args))
    return shlex.join(["lora-rm", *args])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(trained folder, its command, merged folder, its command)."""
    root = tmp_path_factory.mktemp("cards")
    with pytest.MonkeyPatch.context() as monkeypatch:
        trained = run_cli(monkeypatch, *TRAIN, "--output", str(root / "run"))
        merged = run_cli(monkeypatch, "merge", "--adapter", str(root / "run"), "--output", str(root / "merged"))
    return root / "run", trained, root / "merged", merged


def rows_of(metrics: dict) -> list[str]:
    """The card's table rows for these metrics, as model_card renders them."""
    def row(label: str, key: str) -> str:
        low, high = metrics[f"{key}_ci"]
        return f"| {label} | {metrics[key]:.4f} | [{low:.4f}, {high:.4f}] |"

    return [row("this reward model", "accuracy"), row("the longer side wins", "longer_wins_accuracy"),
            row("the shorter side wins", "shorter_wins_accuracy")]


def check_numbers(card: str, metrics: dict, stats: dict) -> None:
    for row in rows_of(metrics):
        assert row in card
    assert f"{metrics['n_pairs']} pairs; reward ties {metrics['tie_rate']:.4f}" in card
    assert f"mean {stats['mean']!r} and std {stats['std']!r}" in card


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)


def lora_rm_reward(adapter) -> float:
    model, tokenizer = load_reward_model("builtin", adapter)
    return score_texts(model, tokenizer, ["a conversation"])[0]


def test_trained_folder_card_renders_its_own_run(folders):
    trained, command, _, _ = folders
    card = ModelCard.load(trained / "README.md")
    assert card.data.library_name == "peft"
    assert {"reward-model", "lora-rm"} <= set(card.data.tags)
    assert card.data.base_model is None and card.data.datasets is None  # the built-in model and task: no hub ids
    assert f"```bash\n{command}\n```" in card.text
    metrics = json.loads((trained / "eval_metrics.json").read_text())
    assert metrics["accuracy_ci"][0] <= metrics["accuracy"] <= metrics["accuracy_ci"][1]  # train's eval has them
    check_numbers(card.text, metrics, json.loads((trained / "reward_stats.json").read_text()))


def test_merged_folder_card_renders_the_adapters_run(folders):
    trained, _, merged, command = folders
    card = ModelCard.load(merged / "README.md")
    assert card.data.library_name == "transformers"
    assert {"reward-model", "lora-rm"} <= set(card.data.tags)
    assert f"```bash\n{command}\n```" in card.text
    check_numbers(card.text, json.loads((trained / "eval_metrics.json").read_text()),
                  json.loads((trained / "reward_stats.json").read_text()))


def test_the_cards_loading_code_gives_lora_rms_reward(folders):
    trained, _, merged, _ = folders
    expected = lora_rm_reward(trained)
    peft_block = python_blocks((trained / "README.md").read_text())[0]
    scope = {"ADAPTER": str(trained)}
    exec(peft_block, scope)  # the card's own PEFT snippet
    assert scope["reward"] == pytest.approx(expected, abs=1e-5)
    scope = {"MODEL": str(merged)}
    exec(python_blocks((merged / "README.md").read_text())[0], scope)  # plain transformers on the merged folder
    assert scope["reward"] == pytest.approx(expected, abs=1e-5)


def test_metadata_names_hub_ids_only(tmp_path):
    local = tmp_path / "prefs.jsonl"
    local.write_text("")
    names = ["trl-lib/ultrafeedback_binarized", str(local), "builtin", None, "trl-lib/ultrafeedback_binarized"]
    data = ModelCard(front_matter("Qwen/Qwen2.5-0.5B", "peft", names)).data
    assert data.base_model == "Qwen/Qwen2.5-0.5B" and data.datasets == ["trl-lib/ultrafeedback_binarized"]
    assert ModelCard(front_matter(str(tmp_path), "transformers", [])).data.base_model is None  # a local base


def test_command_line_is_the_shell_line_that_ran():
    assert command_line(["/venv/bin/lora-rm", "train", "--rows", "-5:", "--dataset", "my prefs.jsonl"]) == \
        "lora-rm train --rows -5: --dataset 'my prefs.jsonl'"
    assert command_line(["/src/lora_rm/__main__.py", "train"]) == "lora-rm train"  # python -m lora_rm, torchrun -m
    assert command_line(["examples/quickstart.py"]) == "python examples/quickstart.py"


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """HfApi's create_repo and upload_folder recorded instead of called; uploaded files are copied to tmp/uploaded."""
    calls = {}

    def create_repo(self, repo_id, **options):
        calls["create_repo"] = (repo_id, options)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **options):
        every = sorted(str(p.relative_to(folder_path)) for p in folder_path.rglob("*") if p.is_file())
        uploaded = sorted(filter_repo_objects(every, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        for name in uploaded:
            (tmp_path / "uploaded" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder_path / name, tmp_path / "uploaded" / name)
        calls["upload_folder"] = (repo_id, uploaded)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls, tmp_path / "uploaded"


def test_push_uploads_the_adapter_folder_that_peft_loads(folders, fake_hub, capsys):
    from peft import PeftModel

    trained, _, _, _ = folders
    calls, uploaded = fake_hub
    cli_main(["push", str(trained), "--repo", "me/tiny-rm", "--private"])
    assert calls["create_repo"] == ("me/tiny-rm", {"private": True, "exist_ok": True})
    repo, files = calls["upload_folder"]
    assert repo == "me/tiny-rm"
    assert files == sorted(["README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
                            "eval_metrics.json", "log.jsonl", "reward_stats.json", "tokenizer.json",
                            "tokenizer_config.json", "train_config.json"])
    assert (trained / "checkpoints").is_dir() and list(trained.glob("events.out.tfevents.*"))  # there, not pushed
    assert "pushed" in capsys.readouterr().out

    tokenizer = AutoTokenizer.from_pretrained(uploaded)  # the uploaded tokenizer appends training's EOS
    model = PeftModel.from_pretrained(builtin_model(builtin_tokenizer()), uploaded).eval()
    with torch.no_grad():
        reward = model(**tokenizer("a conversation", return_tensors="pt")).logits[0, 0].item()
    assert reward == pytest.approx(lora_rm_reward(trained), abs=1e-5)


def test_push_uploads_the_merged_folder(folders, fake_hub):
    _, _, merged, _ = folders
    calls, _ = fake_hub
    cli_main(["push", str(merged), "--repo", "me/tiny-rm-merged"])
    assert calls["create_repo"] == ("me/tiny-rm-merged", {"private": False, "exist_ok": True})
    assert calls["upload_folder"][1] == sorted(["README.md", "chat_template.jinja", "config.json", "model.safetensors",
                                                "tokenizer.json", "tokenizer_config.json"])


def test_push_refuses_a_folder_lora_rm_did_not_write(folders, fake_hub, tmp_path):
    trained, _, _, _ = folders
    checkpoint = next((trained / "checkpoints").iterdir())  # adapter files, but no card: resume state
    for folder in (checkpoint, tmp_path / "missing"):
        with pytest.raises(SystemExit, match=r"^lora-rm: error: .* is not a lora-rm adapter or merged folder"):
            cli_main(["push", str(folder), "--repo", "me/x"])
    assert not fake_hub[0]  # the hub was never called
