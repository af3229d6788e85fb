"""Packed forwards (lora_rm/packing.py): rewards and gradients equal the padded path's, in training and eval too."""

import contextlib
import json

import pytest
import torch
from parity import ARCHS, PAD, TARGETS, perturb_head, tiny_model
from runs import assert_replays, crash_at_micro_batch, tiny_run, train_losses

import lora_rm.optim as optim_module
import lora_rm.packing as packing
from lora_rm import LoraConfig, add_lora, load_adapter
from lora_rm.builtin import builtin_model, builtin_tokenizer
from lora_rm.cli import main
from lora_rm.data import collate_pairs
from lora_rm.encode import pad_sequences
from lora_rm.evaluate import batch_rewards
from lora_rm.inject import lora_layers
from lora_rm.loss import bradley_terry_loss, split_rewards
from lora_rm.train import train

EOS = PAD  # pad == EOS, as for Llama/GPT-2 tokenizers given EOS as their pad token


def edge_pairs() -> list[dict]:
    """Pairs with a shared prompt, an empty prompt, one-token responses, an EOS inside the prompt, a side that ends
    in EOS (read one token earlier) and a side that is its prompt plus EOS alone (read inside the prompt)."""
    generator = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(1, 128, (n,), generator=generator).tolist()

    prompt, eos_prompt = tokens(6), tokens(3) + [EOS] + tokens(3)
    return [
        {"chosen_ids": prompt + tokens(3) + [EOS], "rejected_ids": prompt + tokens(5) + [EOS]},
        {"chosen_ids": tokens(4), "rejected_ids": tokens(2)},  # nothing shared
        {"chosen_ids": prompt + tokens(1), "rejected_ids": prompt + tokens(1)},  # one-token responses
        {"chosen_ids": eos_prompt + tokens(2) + [EOS], "rejected_ids": eos_prompt + tokens(4)},
        {"chosen_ids": prompt + [EOS], "rejected_ids": prompt + tokens(2) + [EOS]},
    ]


def adapted_model(arch: str, dtype: torch.dtype) -> torch.nn.Module:
    """A tiny model with a non-zero adapter and a moved head, so every trained weight changes the rewards."""
    model = add_lora(tiny_model(arch, dtype=dtype), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch]))
    torch.manual_seed(3)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    perturb_head(model)
    return model


def rms_norm_in_input_dtype(model: torch.nn.Module) -> None:
    """Llama-family RMSNorm computes in fp32 even in an fp64 model: where a shared prompt sums its two branches'
    gradients before that rounding and the padded path after, fp32 rounding (~1e-7) shows. Computed in the
    input's dtype instead, the fp64 comparison tests the packing alone."""
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            def forward(hidden, norm=module):
                variance = hidden.pow(2).mean(-1, keepdim=True)
                return norm.weight * (hidden * torch.rsqrt(variance + norm.variance_epsilon))

            module.forward = forward


def padded(model, pairs, side="right"):
    """The padded path's (chosen, rejected) in the model's dtype (batch_rewards rounds them to fp32)."""
    sides = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    input_ids, attention_mask = pad_sequences(sides, PAD, side)
    return split_rewards(model(input_ids=input_ids, attention_mask=attention_mask).logits)


def rewards_and_grads(model, rewards_of) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(chosen, rejected, gradients of a Bradley-Terry loss) for the rewards computed by rewards_of(model)."""
    model.zero_grad(set_to_none=True)
    chosen, rejected = rewards_of(model)
    bradley_terry_loss(chosen, rejected).backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}
    return chosen.detach(), rejected.detach(), grads


def assert_same(a, b, atol: float) -> None:
    for x, y in zip(a[:2], b[:2], strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_rewards_and_gradients_equal_the_padded_path_fp64(arch):
    model = adapted_model(arch, torch.float64).train()
    rms_norm_in_input_dtype(model)
    pairs = edge_pairs()
    oracle = rewards_and_grads(model, lambda m: padded(m, pairs))
    assert (oracle[0] - oracle[1]).abs().max() > 1e-3  # rewards that differ: the comparison means something
    modes = ["padding_free"] if arch == "bert" else ["padding_free", "shared_prompt"]
    for mode in modes:
        packed = rewards_and_grads(model, lambda m, mode=mode: packing.pair_rewards(m, pairs, mode, None, PAD,
                                                                                    "cpu"))
        assert packed[0].dtype == torch.float64
        assert_same(packed, oracle, atol=1e-10)
    if arch in ("llama", "qwen2", "mistral", "opt"):  # left padding scores the same where positions are relative
        # (RoPE) or read from the mask (OPT); RoPE's cos/sin are fp32 at shifted positions, hence fp32's tolerance
        assert_same(rewards_and_grads(model, lambda m: padded(m, pairs, "left")), oracle, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_equals_padded_in_fp32_and_eager_attention(arch):
    model = adapted_model(arch, torch.float32).train()
    model.config._attn_implementation = "eager"  # the additive-mask form of the 4D mask
    pairs = edge_pairs()
    padded = rewards_and_grads(model, lambda m: batch_rewards(m, collate_pairs(pairs, PAD)))
    mode = packing.resolve_packing("auto", model)
    packed = rewards_and_grads(model, lambda m: packing.pair_rewards(m, pairs, mode, 40, PAD, "cpu"))
    assert_same(packed, padded, atol=1e-5)


@pytest.mark.parametrize("mode", ["padding_free", "shared_prompt"])
def test_margins_follow_their_pairs_through_runs_of_a_token_budget(mode):
    """packed_micro_batch copies the margins once and gives each run of the budget its own slice: loss and
    gradients equal the padded batch's Bradley-Terry loss with margins, over several runs."""
    model = adapted_model("llama", torch.float64).train()
    rms_norm_in_input_dtype(model)
    pairs = [{**pair, "margin": margin} for pair, margin in zip(edge_pairs(), [0.0, 0.5, 1.0, -0.5, 2.0], strict=True)]
    runs = packing.chunks_within_budget(packing.pair_groups(pairs), 24, mode == "shared_prompt")
    assert len(runs) >= 3  # the slices are tested, not one run holding every pair

    model.zero_grad(set_to_none=True)
    chosen, rejected = padded(model, pairs)
    expected_loss = bradley_terry_loss(chosen, rejected, torch.tensor([p["margin"] for p in pairs]))
    expected_loss.backward()
    expected = {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}

    model.zero_grad(set_to_none=True)
    loss, _, _ = packing.packed_micro_batch(model, pairs, mode, 24, PAD, "cpu", backward=lambda part: part.backward(),
                                            forward_context=lambda sync: contextlib.nullcontext())
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-10)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], atol=1e-10, rtol=0, msg=name)


def test_shared_prompt_tree_mask_positions_and_reading_points():
    prompt, chosen, rejected = [5, 6, 7], [8, 9], [10]
    packed = packing.pack_groups([[prompt + chosen, prompt + rejected]], pad_token_id=0, share_prompt=True,
                                 encoder=False)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3]]  # the rejected branch restarts after the prompt
    assert packed.read_row.tolist() == [0, 0] and packed.read_column.tolist() == [4, 5]
    assert packed.allowed[0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 1],  # rejected sees the prompt and itself, never chosen
    ]
    assert packing.group_tokens([prompt + chosen, prompt + rejected], share_prompt=True) == 6
    assert packing.group_tokens([prompt + chosen, prompt + rejected], share_prompt=False) == 9


def test_padding_free_rows_are_no_wider_than_the_longest_sequence():
    """First-fit rows: short sequences share a row, each attending only to itself; row ends are padded."""
    packed = packing.pack_groups([[[1, 2, 3, 4], [5, 6]], [[7], [8, 9, 10]]], pad_token_id=0, share_prompt=False,
                                 encoder=False)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4], [8, 9, 10, 7], [5, 6, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 0]]
    assert list(zip(packed.read_row.tolist(), packed.read_column.tolist(), strict=True)) == [
        (0, 3), (2, 1), (1, 3), (1, 2)]
    assert packed.allowed[1].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]]
    assert packed.allowed[2].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert packed.n_tokens == 12 < 2 * 2 * 4  # padded: 4 rows of 4


def test_k_responses_share_one_prompt():
    """A group of n >= 2 sequences (a K-way ranking) lays its common prompt out once."""
    group = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7]]
    packed = packing.pack_groups([group], pad_token_id=0, share_prompt=True, encoder=False)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 3, 5, 6, 7]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4, 2]]
    model = tiny_model("llama", dtype=torch.float64)
    alone = [model(input_ids=torch.tensor([s])).logits.item() for s in group]
    expected = torch.tensor(alone, dtype=torch.float64)
    torch.testing.assert_close(packing.packed_rewards(model, packed, "cpu"), expected)


def test_token_budget_splits_runs_and_drops_or_cuts_long_pairs():
    pairs = [{"chosen_ids": [1] * 5 + [2], "rejected_ids": [1] * 5 + [3], "length": 6} for _ in range(3)]
    groups = packing.pair_groups(pairs)
    assert packing.chunks_within_budget(groups, 14, share_prompt=True) == [[0, 1], [2]]  # 2 rows of 7 a pair
    assert packing.chunks_within_budget(groups, 14, share_prompt=False) == [[0], [1], [2]]  # 2 rows of 6 a pair
    long = {"chosen_ids": list(range(1, 11)), "rejected_ids": list(range(2, 12)), "length": 10}
    kept, changed = packing.fit_pairs_to_budget(pairs + [long], "padding_free", 12, "drop")
    assert (kept, changed) == (pairs, 1)
    kept, changed = packing.fit_pairs_to_budget([long], "padding_free", 12, "truncate_left")
    assert changed == 1 and kept[0]["chosen_ids"] == list(range(5, 11)) and kept[0]["rejected_ids"][-1] == 11


def test_encoder_asked_to_share_a_prompt_falls_back_to_padding_free():
    said = []
    assert packing.resolve_packing("shared_prompt", tiny_model("bert"), said.append) == "padding_free"
    assert "encoder" in said[0] and "padding_free" in said[0]
    assert packing.resolve_packing("auto", tiny_model("llama")) == "shared_prompt"
    assert packing.resolve_packing("auto", tiny_model("bert")) == "padding_free"


def exact_run(output, **overrides):
    """tiny_run without adapter dropout (its masks depend on the tensor shapes), in fp32."""
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    return tiny_run(output, lora=lora, save_every=None, **overrides)


@pytest.mark.slow
def test_training_in_each_packing_mode_gives_the_padded_adapter(tmp_path):
    runs = {"none": {}, "padding_free": {"gradient_checkpointing": True},
            "shared_prompt": {"max_tokens_per_batch": 40}}  # 40 tokens: runs of 3 pairs and 1 (11 tokens a pair)
    metrics = {mode: train(exact_run(tmp_path / mode, packing=mode, **extra)) for mode, extra in runs.items()}
    tokenizer = builtin_tokenizer()
    padded = load_adapter(builtin_model(tokenizer), tmp_path / "none").state_dict()
    for mode in ("padding_free", "shared_prompt"):
        assert train_losses(tmp_path / mode) == pytest.approx(train_losses(tmp_path / "none"), abs=1e-5)
        assert metrics[mode]["mean_margin"] == pytest.approx(metrics["none"]["mean_margin"], abs=1e-5)
        packed = load_adapter(builtin_model(tokenizer), tmp_path / mode).state_dict()
        for key in padded:
            torch.testing.assert_close(packed[key], padded[key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.slow
def test_thirty_steps_of_shared_prompt_stay_on_the_padded_run(tmp_path, monkeypatch):
    """The built-in defaults (r 16, lr 2e-3) for 30 steps: losses agree to rounding at every step. The adapter agrees
    within 1e-5 once AdamW's eps is 1e-3: with its default 1e-8, an entry whose gradient is near zero turns a
    rounding-level difference into a step of up to lr (g / sqrt(v) ~ sign(g)), which after 30 steps is the 8.0e-5
    the issue measured; the same cause as tests/parity.py's PARITY_ADAMW."""

    class AdamWEps(torch.optim.AdamW):
        def __init__(self, params, **options):
            super().__init__(params, **{**options, "eps": 1e-3})

    monkeypatch.setattr(optim_module.torch.optim, "AdamW", AdamWEps)
    for mode in ("none", "shared_prompt"):
        main(["train", "--output", str(tmp_path / mode), "--packing", mode, "--max-steps", "30", "--no-progress"])
    assert train_losses(tmp_path / "shared_prompt") == pytest.approx(train_losses(tmp_path / "none"), abs=1e-6)
    tokenizer = builtin_tokenizer()
    padded = load_adapter(builtin_model(tokenizer), tmp_path / "none").state_dict()
    shared = load_adapter(builtin_model(tokenizer), tmp_path / "shared_prompt").state_dict()
    for key in padded:
        torch.testing.assert_close(shared[key], padded[key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.slow
def test_resume_in_a_packed_mode_replays_the_uninterrupted_run(tmp_path, monkeypatch):
    full = tmp_path / "full"
    train(tiny_run(full, packing="shared_prompt"))
    interrupted = tmp_path / "interrupted"
    undo = crash_at_micro_batch(monkeypatch, 9)  # one packed run per micro-batch: step 5 of 6
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(interrupted, packing="shared_prompt"))
    undo()
    train(tiny_run(interrupted, packing="shared_prompt", resume=True))
    assert_replays(interrupted, full)


def test_cli_eval_and_score_give_the_same_numbers_in_every_mode(tmp_path, capsys):
    output = tmp_path / "run"
    main(["train", "--output", str(output), "--max-rows", "60", "--max-steps", "3", "--batch-size", "4",
          "--lora-r", "4", "--no-progress"])
    capsys.readouterr()
    results = {}
    for mode in ("none", "padding_free", "shared_prompt", "auto"):
        budget = ["--max-tokens-per-batch", "60"] if mode != "none" else []  # padded rows take no token budget
        main(["eval", "--adapter", str(output), "--max-rows", "40", "--packing", mode, *budget])
        results[mode] = json.loads(capsys.readouterr().out)
    for mode in ("padding_free", "shared_prompt", "auto"):
        assert results[mode]["accuracy"] == results["none"]["accuracy"]
        assert results[mode]["mean_margin"] == pytest.approx(results["none"]["mean_margin"], abs=1e-5)
    texts = tmp_path / "texts.txt"
    texts.write_text("What is 1 + 2 ? 3\nWhat is 4 + 4 ? 9\nWhat is 0 + 0 ? 0\n")
    scores = {}
    for mode in ("none", "padding_free"):
        main(["score", "--adapter", str(output), "--input", str(texts), "--packing", mode])
        scores[mode] = [float(line) for line in capsys.readouterr().out.split()]
    assert scores["padding_free"] == pytest.approx(scores["none"], abs=1e-5)


# ---- Hardening 2: --max-tokens-per-batch is never silently ignored --------------------------------------------


def test_max_tokens_per_batch_on_a_padded_run_is_refused(tmp_path, capsys):
    """It bounds packed forwards only: a padded micro-batch (K-way rows, --packing none) put 3,800 sequences into one
    forward whatever the budget said."""
    from lora_rm.config import TrainConfig

    with pytest.raises(ValueError, match="TrainConfig.max_tokens_per_batch bounds packed forwards only"):
        TrainConfig(packing="none", max_tokens_per_batch=64)
    model = builtin_model(builtin_tokenizer())
    with pytest.raises(ValueError, match=r"--max-tokens-per-batch 64 bounds packed forwards only, and --packing auto "
                                         r"runs padded rows here \(K-way rows\).*lower --batch-size"):
        packing.resolve_packing("auto", model, k_way_rows=True, max_tokens_per_batch=64)
    assert packing.resolve_packing("auto", model, k_way_rows=True) == "none"
    assert packing.resolve_packing("auto", model, max_tokens_per_batch=64) == "shared_prompt"
    with pytest.raises(SystemExit) as exited:
        main(["eval", "--adapter", str(tmp_path), "--packing", "none", "--max-tokens-per-batch", "64"])
    assert exited.value.code == 2 and "--max-tokens-per-batch bounds packed forwards only" in capsys.readouterr().err
