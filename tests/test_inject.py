"""Injection: PEFT's matching rule, a frozen base with a trainable head, clear errors, merge_lora."""

import pytest
import torch
from parity import tiny_batch, tiny_model

from lora_rm import LoraConfig, add_lora, format_parameter_counts, merge_lora, parameter_counts
from lora_rm.inject import lora_layers


def wrapped_names(model):
    return sorted(name for name, _ in lora_layers(model))


def test_list_targets_match_exact_names_and_dotted_suffixes():
    model = add_lora(tiny_model("llama"), LoraConfig(target_modules=["q_proj", "model.layers.1.mlp.up_proj"]))
    assert wrapped_names(model) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.self_attn.q_proj",
    ]


def test_string_target_is_a_full_match_regex():
    model = add_lora(tiny_model("llama"), LoraConfig(target_modules=r".*\.0\.self_attn\.(q|v)_proj"))
    assert wrapped_names(model) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_excludes_win_over_targets():
    config = LoraConfig(target_modules="all-linear", exclude_modules=["down_proj", "o_proj"])
    names = wrapped_names(add_lora(tiny_model("llama"), config))
    assert names and not any(n.endswith(("down_proj", "o_proj")) for n in names)


@pytest.mark.parametrize("arch, head", [("llama", "score"), ("gpt2", "score"), ("bert", "classifier")])
def test_all_linear_wraps_every_linear_but_the_head(arch, head):
    model = add_lora(tiny_model(arch), LoraConfig(target_modules="all-linear"))
    names = wrapped_names(model)
    assert head not in names and names
    assert model.lora_rm_config.modules_to_save == [head]
    assert model.lora_rm_config.target_modules == names  # saved resolved, as PEFT does


def test_base_frozen_head_and_adapter_trainable():
    model = add_lora(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if ".lora_" in n or n.startswith("score.")}
    assert not model.model.embed_tokens.weight.requires_grad
    trainable_count, total = parameter_counts(model)
    # 2 layers x (q: A 4x64 + B 64x4, v: A 4x64 + B 32x4, two kv heads) + score 1x64
    assert trainable_count == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4)) + 64
    assert "trainable params: " in format_parameter_counts(model)


def test_only_adapter_and_head_move_after_a_step():
    model = add_lora(tiny_model("llama"), LoraConfig(target_modules="all-linear", init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**tiny_batch()).logits.sum().backward()
    optimizer.step()
    for name, param in model.named_parameters():
        moved = not torch.equal(before[name], param)
        assert moved == param.requires_grad, name


def test_no_match_names_the_nearest_modules():
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        add_lora(tiny_model("llama"), LoraConfig(target_modules=["q_projj"]))


def test_unsupported_layer_type_is_named():
    with pytest.raises(TypeError, match="LlamaAttention"):
        add_lora(tiny_model("llama"), LoraConfig(target_modules=["self_attn"]))


def test_missing_head_is_explained():
    from transformers import AutoModel, LlamaConfig

    plain = AutoModel.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match="no sequence-classification head"):
        add_lora(plain, LoraConfig(target_modules=["q_proj"]))


def test_add_lora_twice_is_refused():
    model = add_lora(tiny_model("llama"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, LoraConfig(target_modules=["q_proj"]))


def test_merge_lora_gives_a_plain_model_with_the_same_rewards():
    model = add_lora(tiny_model("gpt2"), LoraConfig(target_modules="all-linear", init_lora_weights=False))
    batch = tiny_batch()
    adapted = model(**batch).logits
    merged = merge_lora(model)
    assert not list(lora_layers(merged)) and not hasattr(merged, "lora_rm_config")
    torch.testing.assert_close(merged(**batch).logits, adapted, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(merged)


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="LoraConfig.r"):
        LoraConfig(r=0, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="LoraConfig.init_lora_weights"):
        LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq")
    with pytest.raises(ValueError, match="target_modules"):
        LoraConfig()
