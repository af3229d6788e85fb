"""The LoRA math on its own: y = W x + scaling * B A dropout(x), init, merge/unmerge, Conv1D, dtypes."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_rm import LoRALinear
from lora_rm.lora import delta_weight


def random_lora(base: nn.Module, r: int = 4, alpha: float = 8, **kwargs) -> LoRALinear:
    layer = LoRALinear(base, r, alpha, init_lora_weights=False, **kwargs)
    nn.init.normal_(layer.lora_B.weight)  # B != 0 so the update is visible
    return layer


def test_forward_is_the_formula():
    base = nn.Linear(16, 8)
    layer = random_lora(base, r=4, alpha=8)
    x = torch.randn(3, 5, 16)
    expected = base(x) + (8 / 4) * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)


def test_conv1d_is_transposed_once():
    base = Conv1D(8, 16)  # GPT-2 layout: weight (d_in=16, d_out=8)
    layer = random_lora(base)
    x = torch.randn(2, 16)
    torch.testing.assert_close(layer(x), x @ (base.weight + layer.delta_weight()) + base.bias)
    assert layer.delta_weight().shape == base.weight.shape


def test_default_init_is_a_no_op_and_kaiming():
    base = nn.Linear(64, 32)
    layer = LoRALinear(base, r=8, lora_alpha=16)
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), base(x))
    assert (layer.lora_B.weight == 0).all()
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in=64
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3


def test_rslora_scaling():
    assert LoRALinear(nn.Linear(4, 4), r=16, lora_alpha=32, use_rslora=True).scaling == 32 / 4
    assert LoRALinear(nn.Linear(4, 4), r=16, lora_alpha=32).scaling == 2


def test_dropout_only_on_the_adapter_path():
    base = nn.Linear(16, 16)
    layer = LoRALinear(base, r=4, lora_alpha=4, lora_dropout=0.5, init_lora_weights=True)
    layer.train()
    x = torch.randn(8, 16)
    torch.testing.assert_close(layer(x), base(x))  # B = 0: dropout must not touch the base path
    assert isinstance(LoRALinear(base, 4, 4).lora_dropout, nn.Identity)


def test_merge_unmerge_round_trip():
    base = nn.Linear(16, 8)
    original = base.weight.detach().clone()
    layer = random_lora(base)
    x = torch.randn(5, 16)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged)
    torch.testing.assert_close(base.weight, original + layer.delta_weight())
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(base.weight, original)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_train_and_eval_never_merge():
    layer = random_lora(nn.Linear(8, 8))
    layer.eval()
    layer.train()
    assert not layer.merged


def test_merge_refuses_non_finite():
    layer = random_lora(nn.Linear(8, 8))
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        layer.merge()
    assert not layer.merged


def test_half_base_keeps_fp32_adapter_and_returns_base_dtype():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = random_lora(base)
    assert layer.lora_A.weight.dtype == torch.float32
    out = layer(torch.randn(2, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_delta_weight_is_fp32_for_half_inputs():
    a = torch.randn(4, 16, dtype=torch.bfloat16)
    b = torch.randn(8, 4, dtype=torch.bfloat16)
    expected = ((b.float() @ a.float()) * 2.0).to(torch.bfloat16)
    torch.testing.assert_close(delta_weight(a, b, 2.0, False), expected, rtol=0, atol=0)


def test_rejects_other_layer_types():
    with pytest.raises(TypeError, match="Embedding"):
        LoRALinear(nn.Embedding(10, 4), r=2, lora_alpha=2)
