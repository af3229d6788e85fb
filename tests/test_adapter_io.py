"""PEFT's on-disk format: exact saved keys, round trips, and a clear error for every bad input."""

import json

import pytest
import torch
from parity import paired_models, report_config, tiny_batch, tiny_model
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import lora_rm.adapter_io as adapter_io
from lora_rm import LoraConfig, add_lora, load_adapter, merge_lora, save_adapter
from lora_rm.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from lora_rm.builtin import builtin_model, builtin_tokenizer
from lora_rm.inject import lora_layers


@pytest.fixture
def saved(tmp_path):
    """A non-trivial saved llama adapter and the model it came from."""
    model, _ = paired_models("llama", report_config("llama"))
    save_adapter(model, tmp_path)
    return model, tmp_path


def test_saved_keys_are_exactly_adapter_and_head(saved):
    model, folder = saved
    keys = set(load_file(folder / WEIGHTS_NAME))
    expected = {f"base_model.model.{n}.lora_{ab}.weight" for n, _ in lora_layers(model) for ab in "AB"}
    assert keys == expected | {"base_model.model.score.weight"}


def test_bert_head_saves_weight_and_bias(tmp_path):
    save_adapter(add_lora(tiny_model("bert"), LoraConfig(target_modules=["query"])), tmp_path)
    keys = set(load_file(tmp_path / WEIGHTS_NAME))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys


def test_round_trip_unmerged_and_merged(saved):
    model, folder = saved
    batch = tiny_batch()
    loaded = load_adapter(tiny_model("llama"), folder)
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    torch.testing.assert_close(merge_lora(loaded)(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_config_is_peft_shaped(saved):
    _, folder = saved
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["modules_to_save"] == ["score"]


def test_all_linear_string_form_is_read(tmp_path):
    """PEFT writes all-linear resolved to a list; a hand-written config may keep the string: read both."""
    model, _ = paired_models("llama", LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert isinstance(config["target_modules"], list) and len(config["target_modules"]) == 14
    batch = tiny_batch()
    for target_modules in (config["target_modules"], "all-linear"):
        (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "target_modules": target_modules}))
        loaded = load_adapter(tiny_model("llama"), tmp_path)
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_adapter(tiny_model("llama"), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS",
                                                    "target_modules": ["q_proj"]}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        load_adapter(tiny_model("llama"), tmp_path)


def test_corrupt_files(saved):
    _, folder = saved
    (folder / WEIGHTS_NAME).write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_adapter(tiny_model("llama"), folder)
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(tiny_model("llama"), folder)


def test_other_task_type_is_refused(saved):
    _, folder = saved
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "task_type": "CAUSAL_LM"}))
    with pytest.raises(ValueError, match="CAUSAL_LM"):
        load_adapter(tiny_model("llama"), folder)


def test_unimplemented_peft_option_is_refused(saved):
    _, folder = saved
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "lora_bias": True}))
    with pytest.raises(ValueError, match="lora_bias"):
        load_adapter(tiny_model("llama"), folder)


def test_dora_config_without_magnitudes_names_the_missing_key(saved):
    """use_dora loads now (tests/test_dora.py); a file without DoRA's magnitudes must still be refused."""
    _, folder = saved
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="missing keys .*lora_magnitude_vector"):
        load_adapter(tiny_model("llama"), folder)


def test_shape_mismatch_names_key_and_shapes(saved):
    _, folder = saved
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    wider = AutoModelForSequenceClassification.from_config(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, num_labels=1, pad_token_id=0))
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight has shape \(4, 64\) in the file but \(4, 32\)"):
        load_adapter(wider, folder)
    assert not list(lora_layers(wider)), "a failed load must not leave a half-loaded adapter"


def test_missing_head_key_is_named(saved):
    _, folder = saved
    tensors = load_file(folder / WEIGHTS_NAME)
    del tensors["base_model.model.score.weight"]
    save_file(tensors, folder / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="score.weight"):
        load_adapter(tiny_model("llama"), folder)


def test_crash_mid_save_keeps_the_last_good_adapter(saved, monkeypatch):
    model, folder = saved
    before = (folder / WEIGHTS_NAME).read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lora_rm.adapter_io.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, folder)
    assert (folder / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary left


def test_saving_a_merged_layer_is_refused(saved):
    model, folder = saved
    next(lora_layers(model))[1].merge()
    with pytest.raises(ValueError, match="merged"):
        save_adapter(model, folder)


def builtin_like_llama(layers: int) -> torch.nn.Module:
    """The built-in model's shape (hidden 64, 4 heads) with a chosen number of layers."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    return AutoModelForSequenceClassification.from_config(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, num_labels=1, pad_token_id=0))


def test_adapter_of_fewer_layers_is_refused_on_a_deeper_base_and_the_reverse(tmp_path):
    """Full-name targets of a 2-layer adapter match layers 0-1 of a 4-layer base: every key fits, layers 2-3 not."""
    save_adapter(add_lora(builtin_like_llama(2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])), tmp_path / "2")
    deeper = builtin_like_llama(4)
    with pytest.raises(ValueError, match=r"4 base modules of the kinds it adapts have no saved weights: "
                                         r"model\.layers\.2\.self_attn\.q_proj.*\(4 in all\)"):
        load_adapter(deeper, tmp_path / "2")
    assert not list(lora_layers(deeper)), "a failed load must not leave a half-loaded adapter"
    save_adapter(add_lora(builtin_like_llama(4), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])), tmp_path / "4")
    with pytest.raises(ValueError, match=r"4 of its 8 adapted modules are not in the base: model\.layers\.2\."):
        load_adapter(builtin_like_llama(2), tmp_path / "4")
    load_adapter(builtin_like_llama(4), tmp_path / "4")  # the base it was trained on still loads


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch):
    """safetensors reported a full disk as SafetensorError "No space left on device", naming no path."""
    model = add_lora(builtin_model(builtin_tokenizer()), LoraConfig(r=2, target_modules=["q_proj"]))

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(adapter_io, "save_file", full_disk)
    with pytest.raises(OSError, match=f"writing {tmp_path / 'adapter_model.safetensors'} failed: .*No space left"):
        save_adapter(model, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind
