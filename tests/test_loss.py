"""Bradley-Terry loss and metrics, checked live against TRL's RewardTrainer.compute_loss."""

import pytest
import torch
import torch.nn.functional as F

from lora_rm.builtin import builtin_model, builtin_preference_dataset, builtin_tokenizer
from lora_rm.data import collate_pairs, tokenize_pairs
from lora_rm.loss import bradley_terry_loss, preference_metrics, reward_stats, split_rewards


@pytest.fixture(scope="module")
def trl_setup(make_trl_trainer):
    """One TRL trainer around the built-in model with a perturbed head, and a collated batch of 8 pairs."""
    torch.manual_seed(0)
    tokenizer = builtin_tokenizer()
    model = builtin_model(tokenizer, seed=0)
    with torch.no_grad():
        model.score.weight.normal_(std=3.0)  # rewards of order 1, so accuracy and margins are not trivial
    rows = builtin_preference_dataset(8, seed=0)
    trainer = make_trl_trainer(model, tokenizer, rows)
    pairs, _ = tokenize_pairs(rows, tokenizer)
    batch = collate_pairs([pairs[i] for i in range(len(pairs))], tokenizer.pad_token_id)
    return trainer, model, batch


def our_loss_and_metrics(model, batch, coefficient=None):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    chosen, rejected = split_rewards(logits)
    loss = bradley_terry_loss(chosen, rejected, batch.get("margin"), coefficient)
    return loss, preference_metrics(chosen, rejected)


def trl_loss_and_metrics(trainer, model, batch, coefficient=None):
    trainer.args.center_rewards_coefficient = coefficient
    mode = "train" if model.training else "eval"
    trainer._metrics[mode].clear()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
    return loss, {key: values[-1] for key, values in trainer._metrics[mode].items()}


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("coefficient", [None, 0.01])
def test_loss_and_metrics_equal_trl(trl_setup, with_margin, coefficient):
    trainer, model, batch = trl_setup
    batch = dict(batch)
    if with_margin:
        batch["margin"] = torch.linspace(-1.0, 2.0, batch["input_ids"].shape[0] // 2)
    loss, metrics = our_loss_and_metrics(model, batch, coefficient)
    trl_loss, trl_metrics = trl_loss_and_metrics(trainer, model, batch, coefficient)

    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=0)
    assert 0.0 < metrics["accuracy"] < 1.0, "the batch must have pairs ranked both ways to test anything"
    for ours, theirs in [
        ("accuracy", "accuracy"),
        ("mean_margin", "margin"),
        ("min_reward", "min_reward"),
        ("mean_reward", "mean_reward"),
        ("max_reward", "max_reward"),
    ]:
        assert metrics[ours] == pytest.approx(trl_metrics[theirs], abs=1e-6), ours


def test_margin_and_centering_terms():
    chosen, rejected = torch.tensor([1.0, 0.5, -2.0]), torch.tensor([0.0, 1.0, -1.0])
    margin = torch.tensor([0.5, 0.0, -1.0])
    expected = -F.logsigmoid(chosen - rejected - margin).mean() + 0.1 * ((chosen + rejected) ** 2).mean()
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin, 0.1), expected)
    assert bradley_terry_loss(chosen, chosen).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


def test_loss_is_fp32_for_half_inputs():
    chosen, rejected = torch.randn(16).bfloat16(), torch.randn(16).bfloat16()
    loss = bradley_terry_loss(chosen, rejected, torch.zeros(16, dtype=torch.bfloat16), 0.01)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(
        loss, bradley_terry_loss(chosen.float(), rejected.float(), torch.zeros(16), 0.01)
    )


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(4))


def test_ties_count_apart_from_accuracy():
    metrics = preference_metrics(torch.zeros(4), torch.zeros(4))
    assert metrics["accuracy"] == 0.0 and metrics["tie_rate"] == 1.0
    metrics = preference_metrics(torch.tensor([2.0, 1.0, 0.0, 3.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert metrics["accuracy"] == 0.5 and metrics["tie_rate"] == 0.25
    assert metrics["mean_margin"] == pytest.approx(0.75)
    assert (metrics["min_reward"], metrics["max_reward"]) == (0.0, 3.0)
    assert metrics["mean_reward_chosen"] == 1.5 and metrics["mean_reward_rejected"] == 0.75


def test_metrics_on_concatenated_rewards_are_exact_where_batch_means_are_not():
    chosen, rejected = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]), torch.zeros(5)
    whole = preference_metrics(chosen, rejected)["accuracy"]
    batch_means = [preference_metrics(chosen[s], rejected[s])["accuracy"] for s in (slice(0, 4), slice(4, 5))]
    assert whole == pytest.approx(0.6)
    assert sum(batch_means) / 2 != pytest.approx(whole)


def test_split_rewards_and_reward_stats():
    chosen, rejected = split_rewards(torch.arange(6.0).reshape(6, 1))
    assert chosen.tolist() == [0.0, 1.0, 2.0] and rejected.tolist() == [3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="2B"):
        split_rewards(torch.zeros(3))
    rewards = torch.randn(100)
    stats = reward_stats(rewards)
    assert stats == {"mean": pytest.approx(rewards.mean().item()), "std": pytest.approx(rewards.std().item())}
    with pytest.raises(ValueError, match="two rewards"):
        reward_stats(torch.zeros(1))
