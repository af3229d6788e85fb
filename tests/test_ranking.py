"""Rankings of K answers: row shapes, bad rows, the two losses (exactly Bradley-Terry at K = 2), metrics, training."""

import functools
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from runs import crash_at_micro_batch, write_jsonl
from runs import tiny_run as tiny_builtin_run

import lora_rm.evaluate as evaluate_module
import lora_rm.loss as loss_module
import lora_rm.train as train_module
from lora_rm import cli, data, encode, load_adapter
from lora_rm.builtin import builtin_model, builtin_preference_dataset, builtin_ranking_dataset, builtin_tokenizer
from lora_rm.checkpoint import list_checkpoints
from lora_rm.config import TrainConfig
from lora_rm.loss import all_pairs_loss, bradley_terry_loss, plackett_luce_loss, ranking_metrics
from lora_rm.ranking import collate_groups
from lora_rm.train import train


def tiny_run(output, dataset, **overrides) -> TrainConfig:
    """runs.tiny_run on a data file: six steps with accumulation and dropout."""
    return tiny_builtin_run(output, dataset=dataset, **overrides)


def adapter_weights(output):
    return load_adapter(builtin_model(builtin_tokenizer()), output).state_dict()


def pair_rows_and_k2_rows(n=120, margin=False):
    """The built-in pairs, and the same pairs as K = 2 responses/scores rows (every other row written worse first)."""
    pairs, k2 = [], []
    for i, row in enumerate(builtin_preference_dataset(n, seed=0)):
        extra = {"margin": (i % 3) * 0.5} if margin else {}
        pairs.append({**row, **extra})
        responses, scores = [row["chosen"], row["rejected"]], [2.5, -1]
        if i % 2:
            responses, scores = responses[::-1], scores[::-1]
        k2.append({"prompt": row["prompt"], "responses": responses, "scores": scores, **extra})
    return pairs, k2


# -- the losses, as pure functions


def k2_batch(n=6, seed=0):
    """Rewards of n pairs laid out as collate_groups lays out K = 2 rows: every best, then every worse."""
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(2 * n, generator=generator)
    group = torch.arange(n).repeat(2)
    scores = torch.cat([torch.ones(n), torch.zeros(n)])
    return rewards, group, scores


@pytest.mark.parametrize("loss_name", ["all_pairs", "plackett_luce"])
@pytest.mark.parametrize("center", [None, 0.01])
def test_both_losses_are_bradley_terry_bit_for_bit_at_k2(loss_name, center):
    rewards, group, scores = k2_batch()
    margin = torch.tensor([0.0, 0.5, 1.0, 0.0, 2.0, -0.5]) if loss_name == "all_pairs" else None
    ours_input, theirs_input = rewards.clone().requires_grad_(), rewards.clone().requires_grad_()
    if loss_name == "all_pairs":
        ours = all_pairs_loss(ours_input, group, scores, margin, center)
    else:
        ours = plackett_luce_loss(ours_input, group, scores, center)
    chosen, rejected = torch.chunk(theirs_input, 2)
    theirs = bradley_terry_loss(chosen, rejected, margin, center)
    ours.backward()
    theirs.backward()
    assert ours.item() == theirs.item()
    assert torch.equal(ours_input.grad, theirs_input.grad)


def test_all_pairs_averages_each_rows_pairs_then_the_rows_and_skips_ties():
    # row 0: scores 3, 2, 2 -> pairs (0,1), (0,2); the tie 1~2 is no pair. row 1: K = 2, one pair.
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.5, -0.5])
    group = torch.tensor([0, 0, 0, 1, 1])
    scores = torch.tensor([3.0, 2.0, 2.0, 1.0, 0.0])
    nll = lambda d: -F.logsigmoid(torch.tensor(d)).item()  # noqa: E731
    row0 = (nll(1.0 - 0.0) + nll(1.0 - 2.0)) / 2
    row1 = nll(0.5 - (-0.5))
    assert all_pairs_loss(rewards, group, scores).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    with_margin = all_pairs_loss(rewards, group, scores, margin=torch.tensor([1.0, 0.0]))
    row0_margin = (nll(1.0 - 0.0 - 1.0) + nll(1.0 - 2.0 - 1.0)) / 2
    assert with_margin.item() == pytest.approx((row0_margin + row1) / 2, rel=1e-6)


def test_plackett_luce_is_the_listwise_likelihood_and_ties_do_not_compete():
    rewards = torch.tensor([0.3, -1.2, 2.0, 0.7])
    scores = torch.tensor([1.0, 4.0, 2.0, 3.0])  # ranking best first: indices 1, 3, 2, 0
    group = torch.zeros(4, dtype=torch.long)
    ranked = rewards[[1, 3, 2, 0]]
    expected = -sum(ranked[i] - torch.logsumexp(ranked[i:], 0) for i in range(4))
    assert plackett_luce_loss(rewards, group, scores).item() == pytest.approx(expected.item(), rel=1e-6)
    # P(ranking) sums to 1 over the 4! rankings: it is a distribution over orders
    total = sum(math.exp(-plackett_luce_loss(rewards, group, torch.tensor(p, dtype=torch.float32)).item())
                for p in itertools.permutations([0.0, 1.0, 2.0, 3.0]))
    assert total == pytest.approx(1.0, rel=1e-5)
    # scores 2, 1, 1: the best is picked among all three, the tied two add nothing (neither is above the other)
    tied = plackett_luce_loss(rewards[:3], group[:3], torch.tensor([2.0, 1.0, 1.0]))
    assert tied.item() == pytest.approx(-(rewards[0] - torch.logsumexp(rewards[:3], 0)).item(), rel=1e-6)


@pytest.mark.parametrize("loss_name", ["all_pairs", "plackett_luce"])
def test_the_collators_pairs_and_row_count_give_the_same_loss_and_finite_gradients(loss_name):
    """collate_groups works out the pairs and the row count on the host (a GPU step never waits for them); the loss
    of mixed K with ties equals the one that works them out itself, and a response with nothing below it (the last
    of a row, tied ones) sends no NaN back."""
    rows = [{"responses_ids": [[5, 6], [7], [8, 9, 10]], "scores": [2.0, 1.0, 1.0]},
            {"responses_ids": [[5], [6]], "scores": [0.0, 3.0]},
            {"responses_ids": [[5], [6], [7], [8]], "scores": [4.0, 3.0, 2.0, 1.0]}]
    batch = collate_groups(rows, pad_token_id=0)
    assert batch["row_sizes"].tolist() == [3, 2, 4]
    assert len(batch["better"]) == 2 + 1 + 6  # the tied responses of row 0 are no pair
    rewards = torch.randn(9, generator=torch.Generator().manual_seed(0))
    given, worked_out, by_row = (rewards.clone().requires_grad_() for _ in range(3))
    loss = loss_module.ranking_loss(loss_name, given, batch, center_rewards_coefficient=0.01)
    bare = {key: batch[key] for key in ("group", "scores")}
    reference = loss_module.ranking_loss(loss_name, worked_out, bare, center_rewards_coefficient=0.01)
    row_loop = row_by_row_loss(loss_name, [(by_row[batch["group"] == b], batch["scores"][batch["group"] == b])
                                           for b in range(len(rows))], center=0.01)
    (loss + reference + row_loop).backward()
    assert loss.item() == reference.item() == pytest.approx(row_loop.item(), rel=1e-6)
    assert torch.equal(given.grad, worked_out.grad) and torch.isfinite(given.grad).all()
    torch.testing.assert_close(given.grad, by_row.grad, rtol=1e-5, atol=1e-7)


def row_by_row_loss(loss_name, rows, center):
    """The two losses written out one row at a time from their definitions, for rows of (rewards, scores)."""
    per_row, centering = [], []
    for rewards, scores in rows:
        k = range(len(scores))
        if loss_name == "all_pairs":  # mean over the row's pairs with different scores of -log sigmoid(r_i - r_j)
            terms = [-F.logsigmoid(rewards[i] - rewards[j]) for i in k for j in k if scores[i] > scores[j]]
            per_row.append(torch.stack(terms).mean())
        else:  # each response picked first among itself and everything scored below it
            terms = [-(rewards[i] - torch.logsumexp(torch.stack([rewards[i]] + [rewards[j] for j in k
                                                                               if scores[j] < scores[i]]), 0))
                     for i in k if any(scores[j] < scores[i] for j in k)]
            per_row.append(torch.stack(terms).sum())
        centering.append((2 * rewards.mean()) ** 2)
    return torch.stack(per_row).mean() + center * torch.stack(centering).mean()


def test_plackett_luce_refuses_a_margin():
    rewards, group, scores = k2_batch(2)
    batch = {"group": group, "scores": scores, "margin": torch.zeros(2)}
    with pytest.raises(ValueError, match="margin.*all_pairs only"):
        loss_module.ranking_loss("plackett_luce", rewards, batch)


# -- metrics


def test_ranking_metrics_top1_pairwise_kendall_and_ties():
    from scipy.stats import kendalltau

    rows = [
        (torch.tensor([3.0, 1.0, 2.0, 0.0]), [4, 3, 2, 1]),  # best on top; pair (1, 2) swapped
        (torch.tensor([0.0, 1.0, 2.0]), [3, 2, 1]),  # fully reversed
        (torch.tensor([1.0, 1.0, 0.0]), [1, 1, 0]),  # RewardBench 2 lists: 2 chosen above 1 rejected, right
        (torch.tensor([1.0, 0.5, 0.5]), [2, 1, 0]),  # top-1 right; the last pair tied in reward
        (torch.tensor([1.0, 1.0]), [1, 0]),  # a top-1 tie
    ]
    metrics = ranking_metrics([r for r, _ in rows], [s for _, s in rows])
    assert metrics["top1_accuracy"] == pytest.approx(3 / 5)
    assert metrics["top1_tie_rate"] == pytest.approx(1 / 5)
    # strict pairs: 6 + 3 + 2 + 3 + 1 = 15; right 5 + 0 + 2 + 2 + 0 = 9; reward ties 1 + 1 = 2
    assert metrics["n_pairs"] == 15
    assert metrics["pairwise_accuracy"] == pytest.approx(9 / 15) == metrics["accuracy"]
    assert metrics["pairwise_tie_rate"] == pytest.approx(2 / 15)
    taus = [kendalltau(r.numpy(), s).statistic for r, s in rows[:2]]  # no ties: tau-a = tau-b = scipy
    taus += [1.0, (2 - 0) / 3, 0.0]
    assert metrics["kendall_tau"] == pytest.approx(sum(taus) / 5)
    assert metrics["n_rows"] == 5 and metrics["n_responses"] == 15


# -- data: shapes, tokenization, bad rows


def test_every_shape_tokenizes_each_response_as_a_pair_side_best_first():
    tokenizer = builtin_tokenizer()
    chat = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    prompt_chat = [{"role": "user", "content": "What is 1 + 2 ?"}]
    cases = {
        "explicit": ({"prompt": ["What is 1 + 2 ?"], "responses": [[" 4", " 3", " 9"]], "scores": [[1, 5, 0.5]]},
                     "What is 1 + 2 ?", [" 3", " 4", " 9"]),
        "implicit": ({"responses": [["What is 1 + 2 ? 4", "What is 1 + 2 ? 3"]], "scores": [[0, 1]]},
                     None, ["What is 1 + 2 ? 3", "What is 1 + 2 ? 4"]),
        "conversational": ({"prompt": [prompt_chat], "responses": [[chat("4"), chat("3")]], "scores": [[0, 1]]},
                           prompt_chat, [chat("3"), chat("4")]),
        "lists": ({"prompt": ["What is 1 + 2 ?"], "chosen": [[" 3"]], "rejected": [[" 4", " 5", " 6"]]},
                  "What is 1 + 2 ?", [" 3", " 4", " 5", " 6"]),
        "conversational lists": ({"prompt": [prompt_chat], "chosen": [[chat("3")]], "rejected": [[chat("4")]]},
                                 prompt_chat, [chat("3"), chat("4")]),
    }
    for name, (columns, prompt, best_first) in cases.items():
        tokenized, stats = data.tokenize_pairs(Dataset.from_dict(columns), tokenizer)
        row = tokenized[0]
        assert row["responses_ids"] == [encode.encode_text(tokenizer, prompt, r) for r in best_first], name
        assert row["scores"] == sorted(row["scores"], reverse=True), name
        assert stats.n_kept == 1


@pytest.mark.parametrize("row, problem", [
    ({"responses": [" 3"], "scores": [1]}, "responses is not a list of at least 2 responses"),
    ({"responses": [" 3", " 4"], "scores": [1, 0, 2]}, "2 responses but 3 scores"),
    ({"responses": [" 3", " 4"], "scores": [1, 1]}, "all scores are equal"),
    ({"responses": [" 3", " 4"], "scores": [16777217, 16777216]}, "all scores are equal \\(in float32"),
    ({"responses": [" 3", " 4"], "scores": [1e39, 0]}, "scores \\[1e\\+39, 0\\] overflow float32"),
    ({"responses": [" 3", " 4"], "scores": [1, "high"]}, "scores\\[1\\] is not a finite number: 'high'"),
    ({"responses": [" 3", " 4"], "scores": [1, None]}, "scores\\[1\\] is not a finite number: null or NaN"),
    ({"responses": [" 3", " 4"], "scores": [1, float("nan")]}, "scores\\[1\\] is not a finite number: null or NaN"),
    ({"responses": [" 3", ""], "scores": [1, 0]}, "responses\\[1\\] is empty"),
    ({"responses": [" 3", " 3"], "scores": [1, 0]}, "responses 0 and 1 are identical but scored differently"),
    ({"chosen": [" 3"], "rejected": []}, "rejected is not a non-empty list of responses"),
])
def test_bad_k_way_rows_are_named_or_skipped_and_counted(tmp_path, row, problem):
    good = {"responses": [" 3", " 4"], "scores": [1, 0]} if "responses" in row else {"chosen": [" 3"],
                                                                                      "rejected": [" 4"]}
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "What is 1 + 2 ?", **r} for r in (good, row, good)])
    dataset = data.load_preference_dataset(path)
    with pytest.raises(ValueError, match=f"rows.jsonl line 2: {problem}.*--skip-bad-rows"):
        data.tokenize_pairs(dataset, builtin_tokenizer())
    tokenized, stats = data.tokenize_pairs(dataset, builtin_tokenizer(), skip_bad_rows=True)
    assert (stats.n_rows, stats.n_kept, stats.n_bad_skipped) == (3, 2, 1) and len(tokenized) == 2


def test_k_way_length_policy_looks_at_the_longest_response():
    rows = Dataset.from_dict({"prompt": ["What is 1 + 2 ?"] * 2, "responses": [[" 3", " 4"], [" 3", " 4 + 5 + 6"]],
                              "scores": [[1, 0], [1, 0]]})
    tokenizer = builtin_tokenizer()
    kept, stats = data.tokenize_pairs(rows, tokenizer, max_length=10)
    assert stats.n_dropped_too_long == 1 and len(kept) == 1
    cut, stats = data.tokenize_pairs(rows, tokenizer, max_length=10, length_policy="truncate_left")
    assert stats.n_truncated == 1 and max(len(ids) for ids in cut[1]["responses_ids"]) == 10


def test_collate_groups_of_k2_rows_is_collate_pairs_of_the_pairs():
    pairs, k2 = pair_rows_and_k2_rows(5, margin=True)
    tokenizer = builtin_tokenizer()
    pair_rows = data.tokenize_pairs(Dataset.from_list(pairs), tokenizer)[0].to_list()
    k2_rows = data.tokenize_pairs(Dataset.from_list(k2), tokenizer)[0].to_list()
    expected = data.collate_pairs(pair_rows, tokenizer.pad_token_id)
    batch = collate_groups(k2_rows, tokenizer.pad_token_id)
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key
    assert batch["group"].tolist() == [0, 1, 2, 3, 4] * 2


# -- training


@pytest.mark.slow
@pytest.mark.parametrize("loss_name, options", [
    ("all_pairs", {}),
    ("all_pairs", {"margin": True, "center_rewards_coefficient": 0.01}),
    ("plackett_luce", {"center_rewards_coefficient": 0.01}),
])
def test_k2_rows_train_exactly_the_adapter_of_the_pairs(tmp_path, loss_name, options):
    options = dict(options)
    pairs, k2 = pair_rows_and_k2_rows(margin=options.pop("margin", False))
    # K-way rows run padded (packing is not wired to them), so the pairs run padded too: the same forward
    train(tiny_run(tmp_path / "pairs", write_jsonl(tmp_path / "pairs.jsonl", pairs), packing="none", **options))
    train(tiny_run(tmp_path / "k2", write_jsonl(tmp_path / "k2.jsonl", k2), ranking_loss=loss_name, **options))
    a, b = adapter_weights(tmp_path / "pairs"), adapter_weights(tmp_path / "k2")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


def mixed_k_rows(n, seed=0):
    """Built-in K-way rows with K = 4 and K = 3 interleaved: nothing may assume one K, let alone 2."""
    four, three = builtin_ranking_dataset(n, k=4, seed=seed), builtin_ranking_dataset(n, k=3, seed=seed + 100)
    return [row for pair in zip(four, three, strict=True) for row in pair][:n]


@pytest.mark.slow
def test_k_way_resume_replays_the_uninterrupted_run(tmp_path, monkeypatch):
    dataset = write_jsonl(tmp_path / "rows.jsonl", mixed_k_rows(120))
    train(tiny_run(tmp_path / "full", dataset, ranking_loss="plackett_luce"))
    undo = crash_at_micro_batch(monkeypatch, 9, train_module, "ranking_loss")  # step 5 of 6
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(tmp_path / "interrupted", dataset, ranking_loss="plackett_luce"))
    undo()
    assert [p.name for p in list_checkpoints(tmp_path / "interrupted" / "checkpoints")] == ["step-000003"]
    train(tiny_run(tmp_path / "interrupted", dataset, ranking_loss="plackett_luce", resume=True))
    a, b = adapter_weights(tmp_path / "full"), adapter_weights(tmp_path / "interrupted")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    logged = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    final = logged[-1]
    assert final["eval_n_rows"] == 24 and final["eval_n_responses"] == 12 * 4 + 12 * 3


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["all_pairs", "plackett_luce"])
def test_the_k4_arithmetic_task_learns_far_above_chance(tmp_path, loss_name):
    """One right sum and three wrong ones scored by their distance from it: top-1 by chance is 0.25."""
    dataset = write_jsonl(tmp_path / "train.jsonl", builtin_ranking_dataset(800, seed=0))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", builtin_ranking_dataset(200, seed=1))
    metrics = train(TrainConfig(
        dataset=dataset, eval_dataset=held_out, output=str(tmp_path / "run"), ranking_loss=loss_name, lr=2e-3,
        epochs=3, batch_size=16, max_length=32, progress=False,
    ))
    assert metrics["top1_accuracy"] > 0.7, metrics
    assert metrics["pairwise_accuracy"] > 0.8 and metrics["kendall_tau"] > 0.6, metrics


@pytest.mark.slow
def test_both_shapes_train_and_evaluate_from_the_cli(tmp_path, capsys):
    lists = [{"prompt": row["prompt"], "chosen": [row["responses"][row["scores"].index(0)]],
              "rejected": [r for r, s in zip(row["responses"], row["scores"], strict=True) if s != 0]}
             for row in builtin_ranking_dataset(200, seed=0)]
    train_file = write_jsonl(tmp_path / "lists.jsonl", lists)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", builtin_ranking_dataset(40, seed=1))
    output = str(tmp_path / "run")
    cli.main(["train", "--dataset", train_file, "--eval-dataset", held_out, "--output", output, "--max-steps", "4",
              "--ranking-loss", "plackett_luce", "--no-progress"])
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["n_rows"] == 40 and 0 <= trained["top1_accuracy"] <= 1
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["ranking_loss"] == "plackett_luce"
    for dataset, n_rows in ((held_out, 40), (train_file, 200)):
        cli.main(["eval", "--adapter", output, "--dataset", dataset, "--max-length", "32"])
        metrics = json.loads(capsys.readouterr().out)
        assert metrics["n_rows"] == n_rows and metrics["n_responses"] == 4 * n_rows
        assert {"top1_accuracy", "top1_tie_rate", "pairwise_accuracy", "kendall_tau", "reward_stats"} <= set(metrics)
    assert metrics["n_pairs"] == 3 * 200  # the lists rows: 1 chosen above each of 3 rejected, nothing else
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--ranking-loss", "listnet"])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_k_way_rows_under_two_processes_equal_one_process_and_resume(tmp_path):
    """DDP: 2 processes of 2 K-way rows train what 1 process of 4 trains; 9 eval rows shard as 4 + 5 (padded);
    a run preempted under 2 processes resumes exactly."""
    from runs import FLAGS, TESTS, assert_same_run, losses, one_process, torchrun

    rows = write_jsonl(tmp_path / "rows.jsonl", mixed_k_rows(96))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", mixed_k_rows(9, seed=1))
    flags = ["--dataset", rows, "--eval-dataset", held_out, "--eval-every", "2", "--ranking-loss", "plackett_luce"]
    one_process(tmp_path / "one", "--batch-size", "4", *flags)
    two = [*FLAGS, "--batch-size", "2", *flags]
    out = {name: str(tmp_path / name) for name in ("two", "two_resumed")}
    steps = [["--output", out["two"], *two], {"preempt": [out["two"], out["two_resumed"]]},
             ["--output", out["two_resumed"], *two, "--resume"]]
    torchrun(str(TESTS / "ddp_worker.py"), json.dumps(steps))
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert_same_run(tmp_path / "two", tmp_path / "two_resumed", atol=1e-6, rtol=0)
    evals = [[r for r in map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines()) if "eval_n_rows" in r]
             for run in ("one", "two")]  # fmt: skip
    assert [r["eval_n_rows"] for r in evals[1]] == [9, 9] and len(losses(tmp_path / "two")) == 4
    for ours, theirs in zip(*evals, strict=True):
        assert ours["eval_top1_accuracy"] == theirs["eval_top1_accuracy"]
        assert ours["eval_kendall_tau"] == pytest.approx(theirs["eval_kendall_tau"], abs=1e-6)


def test_evaluate_dataset_scores_k_way_rows_and_reports_their_pairs(tmp_path):
    pytest.importorskip("matplotlib")
    from lora_rm.evaluate import evaluate_dataset

    tokenizer = builtin_tokenizer()
    model = builtin_model(tokenizer).eval()
    rows = Dataset.from_list(mixed_k_rows(10))
    metrics, stats, written = evaluate_dataset(model, tokenizer, rows, 32, batch_size=3, report=tmp_path / "report")
    assert stats.n_kept == 10 and metrics["n_rows"] == 10 and metrics["n_responses"] == 5 * 4 + 5 * 3
    # rows batched 3 at a time, position-major, come back row after row: each response's reward as scored alone
    tokenized = data.tokenize_pairs(rows, tokenizer)[0].to_list()
    collator = functools.partial(collate_groups, pad_token_id=tokenizer.pad_token_id)
    batched = evaluate_module.rewards_for_rows(model, tokenized, collator, 3, torch.device("cpu"))
    alone = [model(input_ids=torch.tensor([ids])).logits.item() for row in tokenized for ids in row["responses_ids"]]
    torch.testing.assert_close(batched, torch.tensor(alone), atol=1e-5, rtol=0)
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["n_pairs"] == metrics["n_pairs"] and any(path.suffix == ".png" for path in written)


def test_pairs_and_k_way_rows_mix_between_training_and_evaluation(tmp_path):
    k_way = write_jsonl(tmp_path / "k_way.jsonl", mixed_k_rows(20, seed=1))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", list(builtin_preference_dataset(20, seed=1)))
    on_pairs = train(tiny_run(tmp_path / "pairs_run", "builtin", eval_dataset=k_way, max_steps=2))
    assert on_pairs["n_rows"] == 20 and "top1_accuracy" in on_pairs
    on_k_way = train(tiny_run(tmp_path / "k_way_run", k_way, eval_dataset=pairs, max_steps=2))
    assert on_k_way["n_pairs"] == 20 and "top1_accuracy" not in on_k_way
