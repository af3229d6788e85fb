"""LoRA+ (lr_B = ratio x lr_A) and the PiSSA/OLoRA inits: equal to PEFT (tests/parity.py's separate section),
converted on save to a plain adapter on the original base, resumed exactly, refused where unsupported."""

import json
from dataclasses import replace

import peft
import pytest
import torch
from parity import (
    FP32_TOL,
    FP64_TOL,
    INIT_ARCHS,
    INIT_CHECKS,
    INIT_CHECKS_WITH_PEFT_INIT,
    LORAPLUS,
    LORAPLUS_CHECKS,
    PEFT_FAILS,
    WEIGHT_INITS,
    check_loraplus_groups,
    head_bias_names,
    init_config,
    init_pair,
    loraplus_optimizers,
    lr_and_decay_by_name,
    report_config,
    rewards,
    tiny_batch,
    tiny_model,
)
from runs import assert_replays, crash_at_micro_batch, tiny_run

from lora_rm import LoraConfig, add_lora, load_adapter, save_adapter
from lora_rm.checkpoint import list_checkpoints
from lora_rm.cli import build_parser, train_config_from_args
from lora_rm.config import TrainConfig
from lora_rm.inject import lora_layers, remove_lora
from lora_rm.lora import LoRALinear
from lora_rm.optim import build_optimizer
from lora_rm.train import train

# ---- parity with PEFT (tests/parity.py) ------------------------------------------------------------------------

@pytest.mark.parametrize("check_name", list(LORAPLUS_CHECKS))
@pytest.mark.parametrize("arch", INIT_ARCHS)
def test_loraplus_parity_with_peft(arch, check_name):
    assert LORAPLUS_CHECKS[check_name](arch, report_config(arch)) <= FP32_TOL


@pytest.mark.parametrize("check_name", list(INIT_CHECKS))
@pytest.mark.parametrize("init", WEIGHT_INITS)
@pytest.mark.parametrize("arch", INIT_ARCHS)
def test_init_parity_with_peft(arch, init, check_name):
    if (arch, init) in PEFT_FAILS and check_name in INIT_CHECKS_WITH_PEFT_INIT:
        pytest.skip("PEFT 0.21's olora_init fails on Conv1D (test_peft_olora_fails_on_conv1d_ours_does_not)")
    tolerance = FP64_TOL if "fp64" in check_name else FP32_TOL
    assert INIT_CHECKS[check_name](arch, init_config(arch, init)) <= tolerance


@pytest.mark.parametrize("init", WEIGHT_INITS)
def test_init_is_not_vacuous(init):
    """The adapter holds W's main part (large A, B) and W_res differs from W: the parity rows test something."""
    ours, _, base = init_pair("llama", init_config("llama", init))
    for name, layer in lora_layers(ours):
        assert layer.lora_B.weight.abs().max() > 0.1 and layer.lora_A.weight.abs().max() > 0.1
        original = base.get_submodule(name).weight
        assert (layer.base_layer.weight - original).abs().max() > 0.01


def test_peft_olora_fails_on_conv1d_ours_does_not():
    """PEFT 0.21 QR-decomposes GPT-2's (d_in, d_out) Conv1D weight untransposed: A gets d_out columns, the forward
    fails. Ours transposes it, as pissa_init does, and the model is unchanged at init."""
    ours, theirs, base = init_pair("gpt2", init_config("gpt2", "olora"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        rewards(theirs, tiny_batch())
    assert (rewards(ours, tiny_batch()) - rewards(base, tiny_batch())).abs().max() < FP32_TOL
    c_attn = ours.get_submodule("transformer.h.0.attn.c_attn")
    assert c_attn.lora_A.weight.shape == (4, 64) and c_attn.lora_B.weight.shape == (192, 4)


def test_peft_conversion_drops_the_head_ours_keeps_it(tmp_path):
    """PEFT's converted adapter keeps only lora_A/lora_B keys, so PeftModel cannot load it as SEQ_CLS; ours can."""
    ours, theirs, _ = init_pair("llama", init_config("llama", "pissa"))
    theirs.save_pretrained(tmp_path / "init")
    theirs.save_pretrained(tmp_path / "theirs", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    with pytest.raises(KeyError, match="score"):
        peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "theirs")
    save_adapter(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours").eval()
    assert (rewards(loaded, tiny_batch()) - rewards(ours, tiny_batch())).abs().max() < FP32_TOL


# ---- saving: converted by default, as trained on request ---------------------------------------------------------

def trained_a_little(init: str, use_rslora: bool = False):
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init, use_rslora=use_rslora)
    model = add_lora(tiny_model("llama"), config).eval()
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.weight.add_(0.05 * torch.randn_like(layer.lora_A.weight))
            layer.lora_B.weight.add_(0.05 * torch.randn_like(layer.lora_B.weight))
    return model


@pytest.mark.parametrize("use_rslora", [False, True])
def test_saved_pissa_adapter_is_plain_rank_2r_on_the_original_base(tmp_path, use_rslora):
    model = trained_a_little("pissa", use_rslora)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    assert config["lora_alpha"] == pytest.approx(8 * 2**0.5 if use_rslora else 16)  # the scaling s is unchanged
    loaded = load_adapter(tiny_model("llama"), tmp_path).eval()
    assert (rewards(loaded, tiny_batch()) - rewards(model, tiny_batch())).abs().max() < FP32_TOL


def test_unconverted_save_reloads_by_redoing_the_init(tmp_path):
    """convert_to_plain=False (checkpoints) keeps rank r and init pissa: loading redoes the SVD on the base, as PEFT."""
    model = trained_a_little("pissa")
    save_adapter(model, tmp_path, convert_to_plain=False)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (4, "pissa")
    loaded = load_adapter(tiny_model("llama"), tmp_path).eval()
    assert (rewards(loaded, tiny_batch()) - rewards(model, tiny_batch())).abs().max() < FP32_TOL
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    assert (rewards(theirs, tiny_batch()) - rewards(model, tiny_batch())).abs().max() < FP32_TOL


def test_remove_lora_gives_the_original_weights_back():
    base = tiny_model("llama")
    model = remove_lora(trained_a_little("olora"))
    for key, tensor in base.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], tensor, atol=1e-6, rtol=0)


# ---- refusals --------------------------------------------------------------------------------------------------

def test_init_names_are_checked():
    for good in ("pissa", "pissa_niter_16", "olora"):
        assert LoraConfig(target_modules="all-linear", init_lora_weights=good).init_lora_weights == good
    for bad in ("PiSSA", "pissa_niter_", "pissa_niter_x", "olora2", "loftq"):
        with pytest.raises(ValueError, match="init_lora_weights must be"):
            LoraConfig(target_modules="all-linear", init_lora_weights=bad)


@pytest.mark.parametrize("setting", ["load_in_4bit", "fsdp"])
def test_weight_inits_refuse_4bit_and_fsdp(setting):
    lora = LoraConfig(target_modules="all-linear", init_lora_weights="pissa")
    with pytest.raises(ValueError, match=f"init_lora_weights='pissa' with {setting} is not supported"):
        TrainConfig(lora=lora, **{setting: True})


def test_weight_init_refuses_a_quantized_weight_and_a_rank_too_high():
    packed = torch.nn.Linear(8, 8)
    packed.weight = torch.nn.Parameter(torch.zeros(32, 1, dtype=torch.uint8), requires_grad=False)  # as Linear4bit
    with pytest.raises(ValueError, match="4-bit"):
        LoRALinear(packed, r=2, lora_alpha=2, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="r=16 exceeds the rank"):
        LoRALinear(torch.nn.Linear(8, 32), r=16, lora_alpha=16, init_lora_weights="olora")


def test_loraplus_ratio_must_be_positive():
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be positive"):
        TrainConfig(loraplus_lr_ratio=0.0)


def test_cli_takes_peft_field_names():
    args = build_parser().parse_args(["train", "--init-lora-weights", "pissa_niter_4", "--loraplus-lr-ratio", "16"])
    config = train_config_from_args(args)
    assert config.lora.init_lora_weights == "pissa_niter_4" and config.loraplus_lr_ratio == 16.0
    args = build_parser().parse_args(["train", "--init-lora-weights", "false"])
    assert train_config_from_args(args).lora.init_lora_weights is False


# ---- LoRA+ groups, and an exact resume -------------------------------------------------------------------------

def test_loraplus_gives_b_ratio_times_the_lr_and_keeps_the_head_at_head_lr():
    model = add_lora(tiny_model("bert"), report_config("bert"))
    optimizer = build_optimizer(model, TrainConfig(lora=model.lora_rm_config, head_lr=5e-4, **LORAPLUS))
    by_name = lr_and_decay_by_name(model, optimizer)
    lr, ratio, decay = LORAPLUS["lr"], LORAPLUS["loraplus_lr_ratio"], LORAPLUS["weight_decay"]
    assert {v for k, v in by_name.items() if "lora_A" in k} == {(lr, decay)}
    assert {v for k, v in by_name.items() if "lora_B" in k} == {(lr * ratio, decay)}
    assert {v for k, v in by_name.items() if k.startswith("classifier.")} == {(5e-4, decay)}
    assert optimizer.param_groups[0]["lr"] == lr  # group 0 (logged, checked by health.py) stays A's


def test_head_bias_is_the_one_documented_difference_from_peft():
    """PEFT's create_loraplus_optimizer puts every 1-D parameter in B's group: the head bias gets ratio x lr and no
    weight decay there; we keep it with the head (build_optimizer's docstring). Its gradient is 0 under the
    Bradley-Terry loss (a shift of every reward cancels), so only the weight decay moves it."""
    ours, theirs, ours_opt, theirs_opt = loraplus_optimizers("bert", report_config("bert"))
    assert head_bias_names(ours) == {"classifier.bias"}
    lr, ratio, decay = LORAPLUS["lr"], LORAPLUS["loraplus_lr_ratio"], LORAPLUS["weight_decay"]
    assert lr_and_decay_by_name(ours, ours_opt)["classifier.bias"] == (lr, decay)
    assert lr_and_decay_by_name(theirs, theirs_opt)["classifier.bias"] == (lr * ratio, 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    {"loraplus_lr_ratio": 16.0},
    {"lora": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
                        init_lora_weights="pissa_niter_2")},
], ids=["loraplus", "pissa_niter"])
def test_resume_replays_the_uninterrupted_run(tmp_path, monkeypatch, settings):
    """Interrupted at step 5 of 6, resumed from step 3: the same losses and final adapter as one run. The LoRA+
    groups come back with their learning rates; PiSSA's randomized init is redone from the same seed on resume."""
    full = tmp_path / "full"
    train(tiny_run(full, **settings))
    interrupted = tmp_path / "interrupted"
    undo = crash_at_micro_batch(monkeypatch, 9)  # step 5 of 6
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(interrupted, **settings))
    undo()
    checkpoint = list_checkpoints(interrupted / "checkpoints")[-1]
    groups = json.loads((checkpoint / "trainer_state.json").read_text())["optimizer"]["param_groups"]
    if "loraplus_lr_ratio" in settings:
        assert [g["peak_lr"] for g in groups] == [1e-3, 16e-3, 1e-3]  # A, B, head
    train(tiny_run(interrupted, resume=True, **settings))
    assert_replays(interrupted, full)


def test_loading_an_unconverted_randomized_init_warns(tmp_path):
    model = trained_a_little("pissa_niter_2")
    save_adapter(model, tmp_path, convert_to_plain=False)
    with pytest.warns(UserWarning, match="unconverted pissa_niter_2 adapter"):
        load_adapter(tiny_model("llama"), tmp_path)


def test_reset_parameters_refuses_a_weight_init():
    """Redrawing would need the original W, which the layer no longer holds (it holds W_res): an error, not a no-op."""
    layer = LoRALinear(torch.nn.Linear(8, 8), r=2, lora_alpha=2, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="taken from the base weight once"):
        layer.reset_parameters("pissa")


def test_loraplus_puts_the_dora_magnitude_in_b_group_as_peft():
    """PEFT's create_loraplus_optimizer groups every 1-D adapter tensor with B: DoRA's magnitude gets ratio x lr."""
    config = replace(report_config("llama"), use_dora=True)
    assert check_loraplus_groups("llama", config) == 0.0
    ours, _, ours_opt, _ = loraplus_optimizers("llama", config)
    lrs = lr_and_decay_by_name(ours, ours_opt)
    magnitudes = [name for name in lrs if name.endswith("lora_magnitude_vector")]
    assert magnitudes and all(lrs[name][0] == LORAPLUS["lr"] * LORAPLUS["loraplus_lr_ratio"] for name in magnitudes)
