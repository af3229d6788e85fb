"""The LoRA math on its own: y = W x + scaling * B A dropout(x), init, merge/unmerge, Conv1D, dtypes."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_rm import LoRALinear
from lora_rm.lora import delta_weight, draw_lora_weights, new_lora_pair
from lora_rm.lora_fast import folding_pays


def random_lora(base: nn.Module, r: int = 4, alpha: float = 8, **kwargs) -> LoRALinear:
    layer = LoRALinear(base, r, alpha, init_lora_weights=False, **kwargs)
    nn.init.normal_(layer.lora_B.weight)  # B != 0 so the update is visible
    return layer


def layer_delta(layer: LoRALinear) -> torch.Tensor:
    return delta_weight(layer.lora_A.weight, layer.lora_B.weight, layer.scaling, layer.fan_in_fan_out)


@pytest.mark.parametrize("tokens", [4, 64], ids=["unfolded", "folded"])
def test_fast_path_equals_the_plain_equation(tokens):
    """fast_path=False runs PEFT's one line; the fast path must give the same outputs and gradients."""
    layer = frozen_lora(nn.Linear(8, 8).double())
    x = torch.randn(tokens, 8, dtype=torch.float64)
    results = []
    for fast in (True, False):
        layer.fast_path = fast
        layer.zero_grad()
        x_leaf = x.clone().requires_grad_()
        y = layer(x_leaf)
        y.backward(torch.ones_like(y) + y.detach())
        results.append([y.detach(), x_leaf.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()])
    for fast, plain in zip(*results, strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)


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
    torch.testing.assert_close(layer(x), x @ (base.weight + layer_delta(layer)) + base.bias)
    assert layer_delta(layer).shape == base.weight.shape


def test_default_init_is_a_no_op_and_kaiming():
    base = nn.Linear(64, 32)
    layer = LoRALinear(base, r=8, lora_alpha=16)
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), base(x))
    assert (layer.lora_B.weight == 0).all()
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in=64
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_new_lora_pair_draws_what_a_new_layer_draws(init):
    """The RNG draw order of a fresh adapter lives in new_lora_pair alone (sharded_load draws through it)."""
    base = nn.Linear(8, 6)
    torch.manual_seed(3)
    layer = LoRALinear(base, r=4, lora_alpha=8, init_lora_weights=init)
    after_layer = torch.rand(3)
    torch.manual_seed(3)
    lora_A, lora_B = new_lora_pair(8, 4, 6, init, torch.float32)
    assert torch.equal(lora_A.weight, layer.lora_A.weight) and torch.equal(lora_B.weight, layer.lora_B.weight)
    assert torch.equal(torch.rand(3), after_layer)  # the same number of draws
    assert (lora_B.weight == 0).all() == (init is not False)
    assert list(layer.state_dict()) == ["base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"]


def test_reset_parameters_is_draw_lora_weights():
    layer = LoRALinear(nn.Linear(8, 6), r=4, lora_alpha=8, init_lora_weights=False)
    lora_A, lora_B = layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone()
    draw_lora_weights(lora_A, lora_B, False)
    assert torch.equal(lora_A, layer.lora_A.weight) and (lora_B != 0).any()  # False changes nothing
    torch.manual_seed(5)
    layer.reset_parameters("gaussian")
    torch.manual_seed(5)
    draw_lora_weights(lora_A, lora_B, "gaussian")
    assert torch.equal(lora_A, layer.lora_A.weight) and (layer.lora_B.weight == 0).all() and (lora_B == 0).all()
    assert 0.15 < lora_A.std() < 0.35  # std 1 / r


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
    torch.testing.assert_close(base.weight, original + layer_delta(layer))
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


def frozen_lora(base: nn.Module, **kwargs) -> LoRALinear:
    """A LoRALinear on a frozen base, as add_lora builds it: the only kind that may fold."""
    base.requires_grad_(False)
    return random_lora(base, **kwargs)


def formula_and_grads(layer: LoRALinear, x: torch.Tensor) -> list[torch.Tensor]:
    """y and the gradients of x, A, B, computed by autograd from PEFT's expression W x + s B (A x)."""
    x = x.detach().clone().requires_grad_()
    weight = layer.base_layer.weight.T if layer.fan_in_fan_out else layer.base_layer.weight
    A, B = layer.lora_A.weight.detach().clone().requires_grad_(), layer.lora_B.weight.detach().clone().requires_grad_()
    y = nn.functional.linear(x, weight, layer.base_layer.bias) + (x @ A.T @ B.T) * layer.scaling
    y.backward(torch.ones_like(y) + y.detach())  # a non-uniform upstream gradient
    return [y.detach(), x.grad, A.grad, B.grad]


@pytest.mark.parametrize("base", [nn.Linear(16, 24), Conv1D(24, 16)], ids=["linear", "conv1d"])
def test_folded_path_is_the_same_sum_and_gradients(base):
    """40 tokens > 2*16*24/40 = 19.2: the layer folds; fp64 shows the same sum to rounding."""
    layer = frozen_lora(base.double(), r=4, alpha=8)
    x = torch.randn(5, 8, 16, dtype=torch.float64)
    assert folding_pays(layer, x) and not folding_pays(layer, x[:1, :3])
    x_leaf = x.clone().requires_grad_()
    y = layer(x_leaf)
    assert type(y.grad_fn).__name__ == "FoldedLoRABackward"
    y.backward(torch.ones_like(y) + y.detach())
    ours = [y.detach(), x_leaf.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    for got, expected in zip(ours, formula_and_grads(layer, x), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the same decision and the same forward numbers (reentrant checkpointing relies on it)
        assert folding_pays(layer, x) and not folding_pays(layer, x[:1, :3])
        assert torch.equal(layer(x), ours[0])


def test_folded_path_skips_the_input_gradient_when_nothing_needs_it():
    layer = frozen_lora(nn.Linear(8, 8).double())
    y = layer(torch.randn(32, 8, dtype=torch.float64))  # x does not require grad: the first layer of a model
    y.sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None


def _hooked(layer: LoRALinear) -> LoRALinear:
    layer.base_layer.register_forward_hook(lambda module, args, out: None)
    return layer


@pytest.mark.parametrize(
    "make_layer, shape, dtype",
    [
        (lambda: random_lora(nn.Linear(8, 8)), (64, 8), torch.float32),  # base trainable: W needs its own gradient
        (lambda: frozen_lora(nn.Linear(8, 8), lora_dropout=0.1).train(), (64, 8), torch.float32),  # dropout: A only
        (lambda: _hooked(frozen_lora(nn.Linear(8, 8))), (64, 8), torch.float32),  # e.g. accelerate's offload hook
        (lambda: frozen_lora(nn.Linear(8, 8).to(torch.bfloat16)), (64, 8), torch.bfloat16),
        (lambda: frozen_lora(nn.Linear(8, 8)), (8, 8), torch.float32),  # too few tokens: unfolded is cheaper
    ],
    ids=["trainable-base", "dropout", "hooked-base", "bf16-base", "few-tokens"],
)
def test_unfolded_whenever_folding_would_change_the_result_or_cost_more(make_layer, shape, dtype):
    torch.manual_seed(0)  # inputs drawn here, not at collection: the same in any test order
    layer, x = make_layer(), torch.randn(*shape, dtype=dtype)
    assert not folding_pays(layer, x)
    expected = layer.base_layer(x).float() + layer.scaling * (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    if isinstance(layer.lora_dropout, nn.Identity):
        # bf16: a few roundings of 2^-8 relative to the terms summed, not to the (possibly cancelled) sum
        torch.testing.assert_close(layer(x).float(), expected, rtol=0, atol=4 * 2**-8 * expected.abs().max().item())


def test_autocast_keeps_the_unfolded_path():
    layer = frozen_lora(nn.Linear(8, 8))
    x = torch.randn(64, 8)
    assert folding_pays(layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not folding_pays(layer, x)


def test_dropout_folds_only_in_eval():
    layer = frozen_lora(nn.Linear(8, 8), lora_dropout=0.1)
    x = torch.randn(64, 8)
    assert not folding_pays(layer.train(), x) and folding_pays(layer.eval(), x)
