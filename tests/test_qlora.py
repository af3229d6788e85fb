"""Half and 4-bit bases: what is stored in which dtype, the missing-extra error, merging from nf4, the CLI path."""

import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from lora_rm import LoraConfig, add_lora, merge_lora
from lora_rm.cli import main
from lora_rm.evaluate import score_texts
from lora_rm.inject import lora_layers
from lora_rm.model_io import load_model_and_tokenizer, load_reward_model

TEXTS = ["What is 3 + 4 ? 7", "What is 3 + 4 ? 9", "What is 1 + 1 ? 2"]


def test_bf16_base_keeps_adapter_and_head_fp32_and_scores_in_fp32():
    model, tokenizer = load_model_and_tokenizer("builtin", base_dtype="bf16")
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(layer.base_layer.weight.dtype == torch.bfloat16 for _, layer in lora_layers(model))
    assert all(layer.lora_A.weight.dtype == torch.float32 for _, layer in lora_layers(model))
    assert model.score.weight.dtype == torch.float32 and model.score.weight.requires_grad
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    logits = model(**batch).logits
    assert logits.dtype == torch.float32  # the head reads bf16 hidden states through its cast hook
    logits.sum().backward()
    assert model.score.weight.grad.dtype == torch.float32


def test_load_in_4bit_without_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(ImportError, match=r"lora-rm\[qlora\]"):
        load_model_and_tokenizer("builtin", load_in_4bit=True)


def test_merge_into_4bit_is_refused_and_dequantized_merge_scores_like_the_adapter(tmp_path):
    pytest.importorskip("bitsandbytes")
    main(["train", "--output", str(tmp_path / "run"), "--load-in-4bit", "--bnb-4bit-compute-dtype", "fp32",
          "--max-rows", "80", "--max-steps", "4", "--batch-size", "4", "--r", "4", "--no-progress"])
    model, tokenizer = load_reward_model("builtin", tmp_path / "run", load_in_4bit=True, bnb_4bit_compute_dtype="fp32")
    assert all(type(layer.base_layer).__name__ == "Linear4bit" for _, layer in lora_layers(model))
    with pytest.raises(ValueError, match="4-bit.*Dequantize first"):
        merge_lora(model)
    unmerged = score_texts(model, tokenizer, TEXTS)
    main(["merge", "--adapter", str(tmp_path / "run"), "--load-in-4bit", "--bnb-4bit-compute-dtype", "fp32",
          "--output", str(tmp_path / "merged")])
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(p.is_floating_point() for p in merged.parameters())
    # fp32 compute: the dequantized weights are the ones the 4-bit layers computed with
    assert score_texts(merged, tokenizer, TEXTS) == pytest.approx(unmerged, abs=1e-5)
    assert max(unmerged) - min(unmerged) > 0.01  # the rewards differ: the comparison is not vacuous


def test_merged_bf16_model_keeps_scoring_with_its_fp32_head():
    model, tokenizer = load_model_and_tokenizer("builtin", base_dtype="bf16")
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        adapted = model(**batch).logits
        merged = merge_lora(model)(**batch).logits
    assert merged.dtype == torch.float32 and merged.shape == adapted.shape
    torch.testing.assert_close(merged, adapted, atol=0.1, rtol=0.05)  # the delta rounded into bf16 W
    fp32_model, _ = load_model_and_tokenizer("builtin")
    add_lora(fp32_model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert not fp32_model.score._forward_pre_hooks  # an fp32 head needs no cast
