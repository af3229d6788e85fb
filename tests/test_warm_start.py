"""--init-adapter: a run from a reward adapter starts at `lora-rm eval --adapter`'s numbers, a mismatched one is
refused, an SFT adapter merges into the base as PEFT merges it, and a resume of such a run replays exactly."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from parity import FP32_TOL
from runs import assert_replays, crash_at_micro_batch, read_log, tiny_run, write_jsonl
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForCausalLM

from lora_rm.builtin import builtin_model, builtin_preference_dataset, builtin_tokenizer
from lora_rm.cli import main as cli_main
from lora_rm.config import LoraConfig, TrainConfig
from lora_rm.data import collate_pairs
from lora_rm.evaluate import rewards_for_pairs
from lora_rm.inject import lora_layers
from lora_rm.train import set_up, train
from lora_rm.warm_start import RECORD_NAME, check_base, check_settings_match, init_lora_config, read_init_config

FLAGS = ["--max-rows", "96", "--max-steps", "3", "--max-length", "32", "--batch-size", "8", "--log-every", "1",
         "--no-progress"]  # fmt: skip
LORA_FLAGS = ["--lora-r", "4", "--lora-alpha", "8"]  # the reward adapter's; a run from it takes them unasked


@pytest.fixture(scope="module")
def reward_adapter(tmp_path_factory):
    """A trained reward adapter (B moved off zero) on the built-in model: r=4, alpha=8, every linear layer."""
    output = tmp_path_factory.mktemp("reward") / "run"
    cli_main(["train", "--output", str(output), *FLAGS, *LORA_FLAGS])
    return output


def sft_adapter(folder, base=None):
    """A CAUSAL_LM adapter saved by PEFT (the oracle) on a causal LM: random A and B, so the merge moves weights."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(1)
    causal = base or LlamaForCausalLM(builtin_model(builtin_tokenizer()).config)
    peft_config = PeftLoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                 init_lora_weights=False)
    get_peft_model(causal, peft_config).save_pretrained(folder)
    return folder


def test_step_zero_evaluation_is_eval_of_the_adapter(reward_adapter, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, builtin_preference_dataset(24, seed=7).to_list())
    output = tmp_path / "warm"
    # No LoRA flags: the adapter's own settings (r=4 over every linear layer, not the run's default r=16).
    cli_main(["train", "--output", str(output), *FLAGS, "--init-adapter", str(reward_adapter),
              "--eval-dataset", str(pairs)])
    cli_main(["eval", "--adapter", str(reward_adapter), "--dataset", str(pairs), "--max-length", "32",
              "--batch-size", "8"])
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    log = read_log(output)
    step_zero = log[0]
    assert step_zero["step"] == 0 and step_zero["eval_n_pairs"] == 24
    shared = [key for key in evaluated if f"eval_{key}" in step_zero]
    assert len(shared) >= 8
    for key in shared:
        assert step_zero[f"eval_{key}"] == evaluated[key], key  # exactly, not approximately
    # A fresh schedule (not resume's): the same learning rates as the run the adapter came from.
    assert [r["lr"] for r in log if "lr" in r] == [r["lr"] for r in read_log(reward_adapter) if "lr" in r]
    saved = json.loads((output / "train_config.json").read_text())
    assert saved["init_adapter"] == str(reward_adapter) and saved["lora"]["r"] == 4
    record = json.loads((output / RECORD_NAME).read_text())
    assert record["init_adapter"] == str(reward_adapter.resolve()) and len(record["sha256"]) == 64
    assert load_file(output / "adapter_model.safetensors").keys() == load_file(
        reward_adapter / "adapter_model.safetensors").keys()


def test_a_peft_reward_adapter_starts_where_peft_scores(tmp_path):
    """PEFT's own SEQ_CLS adapter (perturbed head included): the run's model at step 0 gives PEFT's rewards."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    tokenizer = builtin_tokenizer()
    peft_model = get_peft_model(builtin_model(tokenizer), PeftLoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        peft_model.base_model.model.score.modules_to_save["default"].weight.mul_(3.0)
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.eval()

    config = tiny_run(tmp_path / "run", init_adapter=str(tmp_path / "peft"), lora=init_lora_config(tmp_path / "peft"))
    run = set_up(config, 0, 1, torch.device("cpu"))
    pairs, device = run.eval_sets["eval"], torch.device("cpu")
    ours = torch.cat(rewards_for_pairs(run.model, pairs, run.collate, 4, device))
    theirs = torch.cat(rewards_for_pairs(peft_model, pairs, run.collate, 4, device))
    base = torch.cat(rewards_for_pairs(builtin_model(tokenizer), pairs, run.collate, 4, device))
    torch.testing.assert_close(ours, theirs, atol=FP32_TOL, rtol=0)  # the parity contract
    assert (ours - base).abs().max() > 1e-2  # not vacuous: adapter and head moved the rewards


@pytest.mark.parametrize("flags, message", [
    (["--lora-r", "8"], "rank 4 at model.layers.0"),
    (["--lora-alpha", "16"], "lora_alpha 8 at model.layers.0"),
    (["--target-modules", "q_proj,v_proj"], "adapts other modules than this run's target_modules"),
    (["--use-dora"], "use_dora=False in its adapter_config.json"),
    (["--merge-init"], "--merge-init takes a CAUSAL_LM adapter"),
])  # fmt: skip
def test_a_mismatched_adapter_is_refused_in_one_line(reward_adapter, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--output", str(tmp_path / "run"), *FLAGS, "--init-adapter", str(reward_adapter),
                  *flags])
    # a usage error is printed (exit 2), a failure once the model is loaded is the exit message (exit 1)
    error = exit_info.value.code if isinstance(exit_info.value.code, str) else capsys.readouterr().err.strip()
    assert error.startswith("lora-rm: error:") and "\n" not in error and message in error


@pytest.mark.parametrize("settings, message", [
    ({"merge_init": True}, "merge_init needs TrainConfig.init_adapter"),
    ({"init_adapter": "x", "fsdp": True}, "init_adapter with TrainConfig.fsdp is not supported"),
    ({"init_adapter": "x", "merge_init": True, "load_in_4bit": True}, "merge_init with TrainConfig.load_in_4bit"),
    ({"init_adapter": "x", "lora": LoraConfig(target_modules="all-linear", init_lora_weights="olora")},
     "init_lora_weights='olora' with TrainConfig.init_adapter"),
    # --overwrite used to empty the output before the adapter inside it was read: the previous run was lost
    ({"init_adapter": "runs/demo", "output": "runs/demo", "overwrite": True}, "overwrite would delete"),
    ({"init_adapter": "runs/demo/checkpoints/step-000010", "output": "runs/demo", "overwrite": True},
     "overwrite would delete"),
])  # fmt: skip
def test_combinations_it_cannot_do_are_refused_before_anything_loads(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_another_base_or_task_is_refused(reward_adapter, tmp_path):
    moved = tmp_path / "adapter"
    shutil.copytree(reward_adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other"}))
    with pytest.raises(ValueError, match="trained on the base 'org/other'.*not --model 'builtin'"):
        check_base(read_init_config(moved, merge_init=False), "builtin", moved)
    check_base(read_init_config(moved, merge_init=False), "org/other/", moved)  # the same name

    sft = sft_adapter(tmp_path / "sft")
    with pytest.raises(ValueError, match="is a CAUSAL_LM adapter .* add --merge-init"):
        read_init_config(sft, merge_init=False)
    # The layout is compared per module on the base: a regex naming the same modules as a list is the same.
    model = builtin_model(builtin_tokenizer())
    adapter = read_init_config(reward_adapter, merge_init=False)
    same = LoraConfig(r=4, lora_alpha=8, target_modules=r".*(proj)")
    check_settings_match(model, same, adapter, reward_adapter)
    with pytest.raises(ValueError, match="rank 4 at model.layers.0.mlp.down_proj, this run 2"):
        check_settings_match(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                               rank_pattern={"down_proj": 2}), adapter, reward_adapter)


def test_merge_init_starts_from_the_base_with_the_sft_adapter_merged(tmp_path):
    """Step-0 rewards are PEFT's merge_and_unload of the SFT adapter on the base, plus the seed's fresh head."""
    from peft import PeftConfig, PeftModel

    tokenizer = builtin_tokenizer()
    base = tmp_path / "base"  # a causal LM checkpoint, as an SFT run starts from: the reward head is not in it
    LlamaForCausalLM(builtin_model(tokenizer).config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    sft = sft_adapter(tmp_path / "sft", AutoModelForCausalLM.from_pretrained(base))

    config = tiny_run(tmp_path / "run", model=str(base), init_adapter=str(sft), merge_init=True)
    run = set_up(config, 0, 1, torch.device("cpu"))
    assert all(not layer.lora_B.weight.any() for _, layer in lora_layers(run.model))  # a fresh reward adapter

    def oracle(merged: bool):
        torch.manual_seed(config.seed)  # the same fresh head: drawn by from_pretrained right after the run's seed
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        if merged:
            peft_config = PeftConfig.from_pretrained(sft)
            peft_config.task_type = None  # a plain PeftModel: the SFT adapter on the classifier's body
            model = PeftModel.from_pretrained(model, sft, config=peft_config).merge_and_unload()
        return model

    def rewards(model):
        pairs = run.eval_sets["eval"]
        chosen, rejected = rewards_for_pairs(model, pairs, lambda rows: collate_pairs(rows, tokenizer.pad_token_id),
                                             4, torch.device("cpu"))
        return torch.cat([chosen, rejected])

    ours, peft_merged, unmerged = rewards(run.model), rewards(oracle(True)), rewards(oracle(False))
    torch.testing.assert_close(ours, peft_merged, atol=FP32_TOL, rtol=0)
    assert (ours - unmerged).abs().max() > 1e-2  # not vacuous: the merge moved the rewards


@pytest.mark.slow
@pytest.mark.parametrize("route", ["reward", "sft"])
def test_a_resumed_run_from_an_adapter_replays_the_uninterrupted_one(reward_adapter, tmp_path, monkeypatch, route):
    """The resume loads the checkpoint over the init (a re-applied init would reset it), and re-merges an SFT
    adapter into the base (a checkpoint holds only the reward adapter)."""
    # tiny_run's LoRA settings are the reward adapter's (r=4, alpha=8, every linear layer; dropout is not compared)
    if route == "reward":
        settings = {"init_adapter": str(shutil.copytree(reward_adapter, tmp_path / "init"))}
    else:
        settings = {"init_adapter": str(sft_adapter(tmp_path / "sft")), "merge_init": True}
    full = tmp_path / "full"
    train(tiny_run(full, **settings))

    interrupted = tmp_path / "interrupted"
    undo = crash_at_micro_batch(monkeypatch, 9)  # step 5 of 6: the checkpoint of step 3 is the latest
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(interrupted, **settings))
    undo()
    weights = Path(settings["init_adapter"]) / "adapter_model.safetensors"
    original = weights.read_bytes()
    save_file({key: tensor + 1 for key, tensor in load_file(weights).items()}, weights)
    with pytest.raises(ValueError, match="changed since this run started"):
        train(tiny_run(interrupted, resume=True, **settings))
    weights.write_bytes(original)
    train(tiny_run(interrupted, resume=True, **settings))

    assert_replays(interrupted, full)
    assert [r["step"] for r in read_log(interrupted) if "eval_accuracy" in r] == [0, 6]  # step 0 once

