"""The `lora-rm` command end to end on the built-in task: train, eval, score, merge, and its refusals."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from lora_rm import load_adapter
from lora_rm.builtin import builtin_model, builtin_tokenizer
from lora_rm.cli import main, read_score_inputs
from lora_rm.scoring import score_texts

TINY_TRAIN = ["--max-rows", "80", "--max-steps", "4", "--batch-size", "4", "--lora-r", "4", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A built-in reward model trained for four steps through the CLI."""
    output = tmp_path_factory.mktemp("cli") / "run"
    main(["train", "--output", str(output), *TINY_TRAIN])
    return output


def test_train_writes_a_peft_adapter_and_refuses_to_overwrite(trained):
    assert (trained / "adapter_model.safetensors").exists() and (trained / "log.jsonl").exists()
    assert json.loads((trained / "adapter_config.json").read_text())["r"] == 4
    with pytest.raises(SystemExit, match="^lora-rm: error: .* already holds a run; pass --resume"):
        main(["train", "--output", str(trained), *TINY_TRAIN])


def test_eval_prints_one_json_line(trained, capsys):
    main(["eval", "--adapter", str(trained), "--max-rows", "24", "--max-length", "32"])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n_pairs"] == 24 and 0 <= metrics["accuracy"] <= 1
    assert {"mean_margin", "tie_rate", "reward_stats"} <= set(metrics)


def test_score_reads_jsonl_and_plain_lines_and_matches_the_api(trained, tmp_path, capsys):
    inputs = tmp_path / "texts.jsonl"
    inputs.write_text('{"text": "What is 3 + 4 ? 7"}\nWhat is 3 + 4 ? 9\n42\n')
    main(["score", "--adapter", str(trained), "--input", str(inputs)])
    printed = [float(line) for line in capsys.readouterr().out.split()]
    tokenizer = builtin_tokenizer()
    model = load_adapter(builtin_model(tokenizer), trained).eval()
    expected = score_texts(model, tokenizer, ["What is 3 + 4 ? 7", "What is 3 + 4 ? 9", "42"])
    assert printed == pytest.approx(expected, abs=1e-5)
    inputs.write_text('{"prompt": "no text field"}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_score_inputs(str(inputs))


def test_merge_writes_a_plain_model_with_the_same_rewards(trained, tmp_path):
    main(["merge", "--adapter", str(trained), "--output", str(tmp_path / "merged")])
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tokenizer = builtin_tokenizer()
    adapted = load_adapter(builtin_model(tokenizer), trained).eval()
    batch = tokenizer(["What is 1 + 2 ? 3"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=0)
