"""The in-place path (lora_fast.InPlaceLoRA) on half and 4-bit bases and under autocast: what it creates, what it
keeps for backward, and how far it is from the exact sum, against lora.py's equation (`fast_path = False`)."""

import contextlib

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from benchmarks.layer_ops import saved_activation_bytes, trace
from lora_rm import LoRALinear
from lora_rm.lora_fast import choose_path

BATCH, SEQ, R = 2, 37, 8
TOKENS = BATCH * SEQ
SHAPES = [(64, 96), (96, 64)]
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])
# bf16: a half base; autocast: an fp32 base under torch.autocast(bf16); nf4: a 4-bit base computing in bf16 with
# bf16 activations; nf4-fp32: the same base with fp32 activations (lora-rm's default base_dtype, the parity rows').
BASES = ["bf16", "autocast", "nf4", "nf4-fp32"]


def nf4_linear(d_in: int, d_out: int, device: str, dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes Linear4bit (nf4, double-quantized, bf16 compute) built from a random dtype weight."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(d_in, d_out, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    weight = torch.randn(d_out, d_in, dtype=dtype) / d_in**0.5
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer.bias = nn.Parameter(0.1 * torch.randn(d_out, dtype=dtype), requires_grad=False)
    layer = layer.to(device)  # quantizes
    layer.support_avx512bf16_for_cpu = False  # qlora.prepare_4bit_model's guard: no repacking on CPU
    return layer


def adapted_layer(kind: str, d_in: int, d_out: int, device: str = "cpu", b_std: float = 0.05) -> LoRALinear:
    """A LoRALinear (r=8, alpha 16) on a frozen base of `kind`; B != 0 so the update is visible.

    b_std 0.05 makes the update about a quarter of W x here, a trained adapter's size; tests pass larger ones too.
    """
    if kind.startswith("nf4"):
        base = nf4_linear(d_in, d_out, device, torch.bfloat16 if kind == "nf4" else torch.float32)
    else:
        base = nn.Linear(d_in, d_out, device=device, dtype=torch.bfloat16 if kind == "bf16" else torch.float32)
        base.requires_grad_(False)
    layer = LoRALinear(base, R, 2 * R, init_lora_weights=False)
    nn.init.normal_(layer.lora_B.weight, std=b_std)
    return layer


def input_dtype(kind: str) -> torch.dtype:
    return torch.bfloat16 if kind in ("bf16", "nf4") else torch.float32


def base_weight(layer: LoRALinear) -> torch.Tensor:
    """W as the base multiplies it, (d_out, d_in) in fp64: a 4-bit W dequantized."""
    base = layer.base_layer
    if type(base).__name__ == "Linear4bit":
        import bitsandbytes

        return bitsandbytes.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).double()
    return (base.weight.T if layer.fan_in_fan_out else base.weight).double()


def exact(layer: LoRALinear, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """y, dx, dA, dB of W x + b + s B A x in fp64 from the same inputs (the fp32 A and B, W as stored)."""
    x = x.detach().double().requires_grad_()
    A = layer.lora_A.weight.detach().double().requires_grad_()
    B = layer.lora_B.weight.detach().double().requires_grad_()
    bias = layer.base_layer.bias.detach().double()
    y = x @ base_weight(layer).T + bias + layer.scaling * (x @ A.T) @ B.T
    y.backward(grad.double())
    return [y.detach(), x.grad, A.grad, B.grad]


def run(layer: LoRALinear, x: torch.Tensor, grad: torch.Tensor, fast: bool, autocast: bool) -> list[torch.Tensor]:
    """y, dx, dA, dB from the layer with its fast path on or off."""
    layer.fast_path = fast
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        y = layer(x)
    y.backward(grad)
    return [y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]


def errors(got: list[torch.Tensor], expected: list[torch.Tensor]) -> list[float]:
    return [(g.double() - e).abs().max().item() for g, e in zip(got, expected, strict=True)]


def inputs(kind: str, d_in: int, d_out: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(BATCH, SEQ, d_in, device=device).to(input_dtype(kind))
    out_dtype = torch.float32 if kind == "nf4-fp32" else torch.bfloat16  # the output's dtype: its gradient's
    return x, torch.randn(BATCH, SEQ, d_out, device=device).to(out_dtype)


@pytest.mark.parametrize("d_in, d_out", SHAPES)
@pytest.mark.parametrize("kind", ["bf16", "autocast", "nf4"])
def test_in_place_path_writes_no_fp32_activation_and_keeps_only_x_and_h(kind, d_in, d_out):
    """Every op of forward and backward, by dtype and size: no fp32 (tokens x d) tensor; saved: x itself and h."""
    layer = adapted_layer(kind, d_in, d_out)
    x, grad = inputs(kind, d_in, d_out)
    autocast = kind == "autocast"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert choose_path(layer, x) == "in-place"
    activation = TOKENS * min(d_in, d_out)

    x_leaf, y, log, saved = trace(layer, x, grad, autocast)
    assert type(y.grad_fn).__name__ == "InPlaceLoRABackward" and y.dtype == torch.bfloat16
    fp32_made = [op for op in log.activation_ops(activation) if op.dtype == torch.float32]
    # Under autocast x is fp32, so its gradient must be too: that one tensor (and views of it) is allowed.
    grad_storage = x_leaf.grad.untyped_storage().data_ptr()
    assert [op for op in fp32_made if op.storage != grad_storage] == []
    saved_storages = {t.untyped_storage().data_ptr() for t in saved}
    assert x_leaf.untyped_storage().data_ptr() in saved_storages  # x itself, not a copy
    h_bytes = TOKENS * R * torch.bfloat16.itemsize
    assert saved_activation_bytes(saved, list(layer.parameters())) <= x_leaf.nbytes + h_bytes

    _, _, old_log, old_saved = trace(layer_with_fast_path(layer, False), x, grad, autocast)  # not vacuous:
    if kind != "autocast":  # PEFT's casts to the fp32 adapter make activation-sized fp32 tensors the log sees
        assert any(op.dtype == torch.float32 for op in old_log.activation_ops(activation))
    assert saved_activation_bytes(old_saved, list(layer.parameters())) > x_leaf.nbytes + h_bytes


def layer_with_fast_path(layer: LoRALinear, fast: bool) -> LoRALinear:
    layer.fast_path = fast
    return layer


# How close to the exact sum, against the equation it replaces. y and dx: at most 1.5x the equation's error. Both
# round the base output and the sum to bf16 once; the in-place path also rounds A, B and h to bf16 (the products run
# in bf16), which adds about 2^-9 of the update to each output: at a trained adapter's size (update ~ W x / 4) the
# measured ratios are 0.7-1.1 (3 seeds, both shapes, every base), and 1.5 leaves room for the seed without
# admitting a second rounding of W x (2x).
# dA and dB: under autocast the equation multiplies in bf16 as well, and the same 1.5x applies. On a half or 4-bit
# base it multiplies in the fp32 adapter (PEFT's casts, at an fp32 copy of x and of the output), so its dA and dB
# are fp32-exact, ~1e4x closer than any bf16 product can be. There the in-place path's are bounded by bf16's
# own resolution instead: 2 units of 2^-8 at the gradient's largest entry (measured 0.6-1.1 units; the same
# bf16 products under autocast measure 0.7-1.0).
Y_DX_FACTOR = 1.5
BF16_GRAD_UNITS = 2


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("d_in, d_out", SHAPES)
@pytest.mark.parametrize("kind", BASES)
def test_in_place_path_is_as_close_to_the_exact_sum_as_the_equation(kind, d_in, d_out, device):
    layer = adapted_layer(kind, d_in, d_out, device)
    x, grad = inputs(kind, d_in, d_out, device)
    autocast = kind == "autocast"
    expected = exact(layer, x, grad)
    new = errors(run(layer, x, grad, True, autocast), expected)
    old = errors(run(layer, x, grad, False, autocast), expected)
    assert new[0] <= Y_DX_FACTOR * old[0] and new[1] <= Y_DX_FACTOR * old[1], (new, old)
    if autocast or kind == "nf4-fp32":  # the equation's low-rank products are bf16 (autocast) or fp32 (ours too)
        assert new[2] <= Y_DX_FACTOR * old[2] and new[3] <= Y_DX_FACTOR * old[3], (new, old)
    else:
        for error, reference in zip(new[2:], expected[2:], strict=True):
            assert error <= BF16_GRAD_UNITS * 2**-8 * reference.abs().max().item(), (new, old)
    assert (expected[0] - (x.double() @ base_weight(layer).T)).abs().max() > 0.1  # the update is not vacuous


@pytest.mark.parametrize("b_std", [0.2, 1.0])
def test_a_large_update_costs_at_most_its_own_bf16_rounding(b_std):
    """Update ~ W x (0.2) or ~ 5 W x (1.0): y's error grows by at most 2 units of 2^-8 of the update, not of y."""
    layer = adapted_layer("bf16", 64, 96, b_std=b_std)
    x, grad = inputs("bf16", 64, 96)
    expected = exact(layer, x, grad)
    update = expected[0] - (x.double() @ base_weight(layer).T + layer.base_layer.bias.double())
    new, old = (errors(run(layer, x, grad, fast, False), expected)[0] for fast in (True, False))
    assert new <= old + 2 * 2**-8 * update.abs().max().item(), (new, old)


def test_conv1d_half_base_takes_the_in_place_path():
    base = Conv1D(96, 64).to(torch.bfloat16).requires_grad_(False)  # GPT-2 layout: weight (d_in, d_out)
    layer = LoRALinear(base, R, 2 * R, init_lora_weights=False)
    nn.init.normal_(layer.lora_B.weight, std=0.05)
    x, grad = inputs("bf16", 64, 96)
    assert choose_path(layer, x) == "in-place"
    expected = exact(layer, x, grad)
    new, old = errors(run(layer, x, grad, True, False), expected), errors(run(layer, x, grad, False, False), expected)
    assert new[0] <= Y_DX_FACTOR * old[0] and new[1] <= Y_DX_FACTOR * old[1], (new, old)


def test_in_place_path_without_grad_and_for_a_first_layer():
    """The same forward numbers under no_grad (reentrant checkpointing's first pass); x without grad (a first layer)."""
    layer = adapted_layer("bf16", 64, 96)
    x, grad = inputs("bf16", 64, 96)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), y)
    y.backward(grad)
    assert layer.lora_A.weight.grad.dtype == layer.lora_B.weight.grad.dtype == torch.float32


def _hooked(layer: LoRALinear) -> LoRALinear:
    layer.base_layer.register_forward_hook(lambda module, args, out: None)
    return layer


@pytest.mark.parametrize(
    "make_layer, autocast, expected",
    [
        (lambda: adapted_layer("bf16", 8, 8), False, "in-place"),
        (lambda: adapted_layer("bf16", 8, 8).eval(), False, "in-place"),
        (lambda: adapted_layer("autocast", 8, 8), True, "in-place"),
        (lambda: adapted_layer("nf4", 64, 64), False, "in-place"),
        (lambda: adapted_layer("nf4", 64, 64), True, None),  # bitsandbytes casts around autocast its own way
        (lambda: LoRALinear(nn.Linear(8, 8).bfloat16().requires_grad_(False), 4, 8, lora_dropout=0.1), False, None),
        (lambda: LoRALinear(nn.Linear(8, 8).bfloat16().requires_grad_(False), 4, 8, lora_dropout=0.1).eval(), False,
         "in-place"),
        (lambda: LoRALinear(nn.Linear(8, 8).bfloat16(), 4, 8), False, None),  # a trainable base needs W's gradient
        (lambda: _hooked(adapted_layer("bf16", 8, 8)), False, None),  # the base module is never called
        (lambda: adapted_layer("fp32", 8, 8), False, "unfolded"),  # fp32: the paths as they were
    ],
    ids=["bf16", "bf16-eval", "autocast", "nf4", "nf4-autocast", "dropout", "dropout-eval", "trainable-base",
         "hooked-base", "fp32"],
)
def test_choose_path(make_layer, autocast, expected):
    """None means lora.py's equation runs, and then it is the very same computation as fast_path = False."""
    layer = make_layer()
    d_in = layer.lora_A.in_features
    dtype = torch.float32 if autocast or layer.lora_A.weight.dtype == layer.base_layer.weight.dtype else torch.bfloat16
    x = torch.randn(BATCH, 3, d_in, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert choose_path(layer, x) == expected
        if expected is None:
            torch.manual_seed(1)
            fast = layer(x)
            layer.fast_path = False
            torch.manual_seed(1)
            assert torch.equal(fast, layer(x))
