"""lora-rm equals PEFT (the live oracle) on tiny models of several families; see tests/parity.py."""

import pytest
import torch
from parity import (
    BF16_UNITS,
    CHECKS,
    CORE_ARCHS,
    FP32_TOL,
    FP64_TOL,
    NF4_CHECKS,
    QUANT_ARCHS,
    check_rewards_differ_from_base,
    paired_models,
    quantized_base,
    quantized_pair,
    report_config,
    rewards,
    tiny_batch,
)

from lora_rm import LoraConfig, add_lora, enable_gradient_checkpointing, save_adapter
from lora_rm.inject import lora_layers

PARITY_CHECKS = [name for name in CHECKS if name != "adapted != base (must be large)"]


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_adapter_is_not_vacuous(arch):
    """B != 0 and a perturbed head: the adapted rewards must differ from the base, or parity proves nothing."""
    assert check_rewards_differ_from_base(arch, report_config(arch)) > 0.1


@pytest.mark.parametrize("check_name", PARITY_CHECKS)
@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_parity_with_peft(arch, check_name):
    tolerance = BF16_UNITS if "2^-8 units" in check_name else FP64_TOL if "fp64" in check_name else FP32_TOL
    assert CHECKS[check_name](arch, report_config(arch)) <= tolerance


@pytest.mark.parametrize("check_name", list(NF4_CHECKS))
@pytest.mark.parametrize("arch", QUANT_ARCHS)
def test_nf4_parity_with_peft_and_bitsandbytes(arch, check_name, tmp_path):
    """nf4 base, fp32 elsewhere: the same Linear4bit forward under both adapters, so fp32's contract applies."""
    pytest.importorskip("bitsandbytes")
    assert NF4_CHECKS[check_name](arch, report_config(arch)) <= FP32_TOL


@pytest.mark.parametrize("arch", QUANT_ARCHS)
def test_nf4_adapter_is_not_vacuous_and_base_is_4bit(arch, tmp_path):
    pytest.importorskip("bitsandbytes")
    ours, _ = quantized_pair(arch, report_config(arch), str(tmp_path))
    base = quantized_base(arch, str(tmp_path))
    adapted_layers = [layer.base_layer for _, layer in lora_layers(ours)]
    assert adapted_layers and all(type(layer).__name__ == "Linear4bit" for layer in adapted_layers)
    head = ours.get_submodule(ours.lora_rm_config.modules_to_save[0])
    assert all(p.dtype == torch.float32 and p.requires_grad for p in head.parameters())  # never quantized
    with torch.no_grad():
        assert (rewards(ours, tiny_batch()) - rewards(base, tiny_batch())).abs().max() > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("check_name", ["PEFT loads ours: rewards", "we load PEFT's: rewards", "gradients"])
@pytest.mark.parametrize("arch", ["qwen2", "mistral", "opt"])
def test_parity_with_peft_more_families(arch, check_name):
    assert CHECKS[check_name](arch, report_config(arch)) <= FP32_TOL


def test_peft_saves_the_same_keys_and_config(tmp_path):
    """Same key set and same shared config fields as PEFT's save_pretrained (the head included)."""
    import json

    from safetensors.torch import load_file

    ours, theirs = paired_models("llama", report_config("llama"))
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs_keys = set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert ours_keys == theirs_keys
    assert "base_model.model.score.weight" in ours_keys
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for field in ["r", "lora_alpha", "lora_dropout", "use_rslora", "peft_type", "task_type", "bias", "fan_in_fan_out"]:
        assert ours_config[field] == theirs_config[field], field
    assert set(ours_config["target_modules"]) == {n for n, _ in lora_layers(ours)}


def test_gpt2_conv1d_saves_fan_in_fan_out_like_peft(tmp_path):
    import json

    ours, theirs = paired_models("gpt2", report_config("gpt2"))
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert ours_config["fan_in_fan_out"] is theirs_config["fan_in_fan_out"] is True


def test_gaussian_init_matches_peft_rule():
    """PEFT draws extra random numbers, so seeds cannot align A; compare the rule: A ~ N(0, 1/r), B = 0."""
    from parity import tiny_model

    r = 16
    model = add_lora(tiny_model("llama"), LoraConfig(r=r, target_modules="all-linear", init_lora_weights="gaussian"))
    a_values = torch.cat([layer.lora_A.weight.flatten() for _, layer in lora_layers(model)])
    assert a_values.std().item() == pytest.approx(1 / r, rel=0.05)
    assert a_values.mean().abs().item() < 0.01
    assert all((layer.lora_B.weight == 0).all() for _, layer in lora_layers(model))


def test_reentrant_checkpointing_without_the_hook_loses_lora_gradients():
    """The trap our input-grad hook exists for: without it, reentrant checkpointing leaves LoRA grads None."""
    ours, _ = paired_models("llama", report_config("llama"))
    ours.train()
    hook = enable_gradient_checkpointing(ours, use_reentrant=True)
    hook.remove()
    scores = ours(**tiny_batch()).logits.squeeze(-1)
    scores.sum().backward()
    _, first_layer = next(lora_layers(ours))
    assert first_layer.lora_A.weight.grad is None
