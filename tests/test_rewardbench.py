"""RewardBench's official scores: ours equal the `rewardbench` package's own functions on the same rewards.

The oracle is rewardbench 0.1.4 from PyPI, installed without its dependencies (`pip install --no-deps
rewardbench==0.1.4`: they pin transformers==4.51). Its package __init__ imports every model class, which fails on
today's transformers, so the scoring modules are loaded without it (oracle() below). Fixtures follow the published
schemas: allenai/reward-bench's filtered split, allenai/pref-test-sets (a prompt as a message list, the split name
as subset, as rewardbench's load_eval_dataset adds it) and allenai/reward-bench-2.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import random
import sys
import types

import numpy as np
import pytest
import torch
from datasets import Dataset
from runs import write_jsonl

from lora_rm import cli, rewardbench
from lora_rm.builtin import builtin_model, builtin_tokenizer
from lora_rm.config import LoraConfig
from lora_rm.encode import encode_text

TOLERANCE = 1e-12


@pytest.fixture(scope="module")
def oracle():
    """rewardbench's utils, constants and analysis.get_benchmark_results, loaded without the package __init__."""
    spec = importlib.util.find_spec("rewardbench")
    if spec is None or importlib.util.find_spec("analysis") is None:
        pytest.skip("the oracle is not installed: pip install --no-deps rewardbench==0.1.4")
    before = set(sys.modules)
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] in ("rewardbench",
                                                                                                "analysis")}
    package = types.ModuleType("rewardbench")
    package.__path__ = list(spec.submodule_search_locations)  # submodules load; the __init__ never runs
    models = types.ModuleType("rewardbench.models")
    models.REWARD_MODEL_CONFIG = {}  # utils imports it; the model classes need transformers 4.51
    sys.modules.update({"rewardbench": package, "rewardbench.models": models})
    if importlib.util.find_spec("fastchat") is None:  # utils imports Conversation for a type hint only
        conversation = types.ModuleType("fastchat.conversation")
        conversation.Conversation = object
        sys.modules.update({"fastchat": types.ModuleType("fastchat"), "fastchat.conversation": conversation})
    try:
        yield types.SimpleNamespace(
            utils=importlib.import_module("rewardbench.utils"),
            constants=importlib.import_module("rewardbench.constants"),
            results=importlib.import_module("analysis.get_benchmark_results"),
        )
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]
        sys.modules.update(saved)


def arithmetic(rng: random.Random, n_answers: int) -> tuple[str, list[str]]:
    """A prompt and n distinct answers in the built-in tokenizer's words, the right sum first."""
    a, b = rng.randrange(10), rng.randrange(10)
    wrong = rng.sample([n for n in range(19) if n != a + b], n_answers - 1)
    return f"What is {a} + {b} ?", [f"{a + b}", *(f"{n}" for n in wrong)]


def v1_rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Every v1 subset (2 to 5 rows each) in allenai/reward-bench's schema, and every prior set in pref-test-sets'."""
    rng = random.Random(seed)
    core, prior = [], []
    for index, subset in enumerate([*rewardbench.EXAMPLE_COUNTS, *rewardbench.PRIOR_SETS]):
        for _ in range(2 + index % 4):
            prompt, (chosen, rejected) = arithmetic(rng, 2)
            if subset in rewardbench.PRIOR_SETS:
                prior.append({"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected,
                              "subset": subset})
            else:
                core.append({"prompt": prompt, "chosen": chosen, "chosen_model": "gpt-4", "rejected": rejected,
                             "rejected_model": "llama", "subset": subset, "id": len(core)})
    return core, prior


def v2_rows(seed: int = 0) -> list[dict]:
    """Every RewardBench 2 subset in allenai/reward-bench-2's schema: 1 chosen of 4 outside Ties; Ties' "ref:N" rows
    and "tied:N" rows with several correct answers (one prompt has only a ref row, one tied row a single correct)."""
    rng = random.Random(seed)
    rows = []

    def row(subset: str, row_id: str, n_correct: int, n_answers: int) -> dict:
        prompt, answers = arithmetic(rng, n_answers)
        return {"id": row_id, "prompt": prompt, "chosen": answers[:n_correct], "rejected": answers[n_correct:],
                "num_correct": n_correct, "num_incorrect": n_answers - n_correct, "total_completions": n_answers,
                "models": ["m"] * n_answers, "subset": subset, "additional_metadata": {"category": subset}}

    for subset in rewardbench.V2_SUBSETS[:-1]:
        rows += [row(subset, str(len(rows)), 1, 4) for _ in range(4 + len(subset) % 3)]
    for prompt in range(6):
        rows.append(row("Ties", f"ref:{prompt}", 1 + prompt % 2, 4))
        if prompt != 5:
            rows.append(row("Ties", f"tied:{prompt}", 1 if prompt == 0 else 3, 6))
    return rows


def tied_rewards(n: int, rng: random.Random) -> list[float]:
    """Rewards on a coarse grid, so that ties (equal rewards) happen."""
    return [rng.randrange(-4, 5) / 2 for _ in range(n)]


def test_constants_are_the_oracles(oracle):
    assert rewardbench.EXAMPLE_COUNTS == oracle.constants.EXAMPLE_COUNTS
    assert rewardbench.SUBSET_MAPPING == oracle.constants.SUBSET_MAPPING


def oracle_v1(oracle, subset_of: list[str], chosen: list[float], rejected: list[float]):
    """run_rm.py's per-subset scores, calculate_scores_per_section and get_average_over_rewardbench's table."""
    results = [1 if c > r else 0 for c, r in zip(chosen, rejected, strict=True)]  # run_rm.py
    grouped = {}
    for subset in np.unique(subset_of):
        mine = [result for result, s in zip(results, subset_of, strict=True) if s == subset]
        grouped[str(subset)] = sum(mine) / len(mine)
    sections = oracle.utils.calculate_scores_per_section(rewardbench.EXAMPLE_COUNTS, rewardbench.SUBSET_MAPPING,
                                                         grouped)
    core = {k: v for k, v in grouped.items() if k in rewardbench.EXAMPLE_COUNTS}
    prefs = {k: v for k, v in grouped.items() if k in rewardbench.PRIOR_SETS}
    frame = oracle.results.pd.DataFrame([{"model": "m", "model_type": "Seq. Classifier", **core}])
    if not prefs:  # another model's prior sets: this one has none, so the table masks its Prior Sets out
        prefs = {name: 0.5 for name in rewardbench.PRIOR_SETS_AVERAGED}
    frame_prefs = oracle.results.pd.DataFrame([{"model": "m" if len(prefs) > 4 else "other", **prefs}])
    table = oracle.results.get_average_over_rewardbench(frame, frame_prefs).iloc[0]
    return grouped, sections, table


@pytest.mark.parametrize("with_prior_sets", [True, False])
def test_v1_sections_prior_sets_and_overall_equal_the_oracle(oracle, with_prior_sets):
    core, prior = v1_rows()
    rows = core + prior if with_prior_sets else core
    rng = random.Random(1)
    chosen, rejected = tied_rewards(len(rows), rng), tied_rewards(len(rows), rng)
    lengths_chosen = [rng.randrange(3, 9) for _ in rows]
    lengths_rejected = [rng.randrange(3, 9) for _ in rows]
    subsets = [row["subset"] for row in rows]
    ours = rewardbench.v1_report(torch.tensor(chosen), torch.tensor(rejected), lengths_chosen, lengths_rejected,
                                 subsets)
    assert ours["complete"] == with_prior_sets
    for rule, (c, r) in {"score": (chosen, rejected), "longer_wins_score": (lengths_chosen, lengths_rejected),
                         "shorter_wins_score": ([-n for n in lengths_chosen], [-n for n in lengths_rejected])}.items():
        grouped, sections, table = oracle_v1(oracle, subsets, c, r)
        for subset, score in grouped.items():
            assert ours["subsets"][subset][rule] == pytest.approx(score, abs=TOLERANCE, rel=0)
        assert set(ours["sections"]) == set(sections) == set(rewardbench.SUBSET_MAPPING)
        for section, score in sections.items():
            assert ours["sections"][section][rule] == pytest.approx(score, abs=TOLERANCE, rel=0)
            assert ours["sections"][section][rule] == pytest.approx(table[section], abs=TOLERANCE, rel=0)
        if with_prior_sets:
            assert ours["prior_sets"][rule] == pytest.approx(table["Prior Sets (0.5 weight)"], abs=TOLERANCE, rel=0)
            without = np.mean([sections[name] for name in rewardbench.SUBSET_MAPPING])
            assert ours["overall_without_prior_sets"][rule] == pytest.approx(without, abs=TOLERANCE, rel=0)
        else:
            assert "prior_sets" not in ours and np.isnan(table["Prior Sets (0.5 weight)"])
        assert ours["overall"][rule] == pytest.approx(table["average"], abs=TOLERANCE, rel=0)
        low, high = ours["overall"][f"{rule}_ci"]
        assert low <= ours["overall"][rule] <= high


def oracle_v2(oracle, rows: list[dict], rewards: list[list[float]]) -> dict[str, float]:
    """run_v2.py's per-subset scores: reroll_and_score_dataset's results, process_single_model for Ties."""
    unrolled = [{"text": text, "scores": score, "id": row["id"], "subset": row["subset"]}
                for row, row_rewards in zip(rows, rewards, strict=True)
                for text, score in zip(row["chosen"] + row["rejected"], row_rewards, strict=True)]
    rerolled = oracle.utils.reroll_and_score_dataset(Dataset.from_list(unrolled), [len(r) for r in rewards])
    scores = {}
    for subset in rewardbench.V2_SUBSETS:
        mine = [i for i, row in enumerate(rows) if row["subset"] == subset]
        if subset == "Ties":
            ties = Dataset.from_list([{"id": rows[i]["id"], "scores": rewards[i], "num_correct": rows[i]["num_correct"]}
                                      for i in mine])
            scores[subset] = oracle.utils.process_single_model(ties)[1]
        else:
            scores[subset] = sum(rerolled[i]["results"] for i in mine) / len(mine)
    return scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_v2_subsets_ties_and_overall_equal_the_oracle(oracle, seed):
    rows = v2_rows(seed)
    rng = random.Random(seed)
    rewards = [tied_rewards(len(row["chosen"]) + len(row["rejected"]), rng) for row in rows]
    lengths = [[rng.randrange(3, 9) for _ in row_rewards] for row_rewards in rewards]
    ours = rewardbench.v2_report([torch.tensor(r, dtype=torch.float64) for r in rewards], lengths,
                                 [row["subset"] for row in rows], [row["id"] for row in rows],
                                 [row["num_correct"] for row in rows])
    assert ours["complete"] and set(ours["subsets"]) == set(rewardbench.V2_SUBSETS)
    for rule, as_reward in {"score": rewards, "longer_wins_score": lengths,
                            "shorter_wins_score": [[-n for n in row] for row in lengths]}.items():
        theirs = oracle_v2(oracle, rows, [[float(x) for x in row] for row in as_reward])
        for subset, score in theirs.items():
            assert ours["subsets"][subset][rule] == pytest.approx(score, abs=TOLERANCE, rel=0), (rule, subset)
        # the package computes no overall: the leaderboard's unweighted mean of the six subsets
        assert ours["overall"][rule] == pytest.approx(np.mean(list(theirs.values())), abs=TOLERANCE, rel=0)


def test_ties_splits_credit_and_the_tie_score_has_its_parts():
    assert rewardbench.best_of_n_result([2.0, 1.0, 2.0, 0.0]) == 0.5  # a tie at the top halves the credit
    assert rewardbench.best_of_n_result([1.0, 1.0, 1.0, 1.0]) == 0.25 and rewardbench.best_of_n_result([0, 1]) == 0
    # every correct far above every incorrect, correct answers close together: every part of the composite is won
    prompts = rewardbench.ties_prompts([[5.0, 0.0], [5.0, 4.9, 0.0]], ["ref:0", "tied:0"], [1, 2])
    score = rewardbench.ties_score(prompts, torch.ones(1, 1, dtype=torch.float64)).item()
    assert score == pytest.approx(0.3 + 0.3 + 0.2 + 0.2 + 0.01 * np.tanh(4.9 / 0.1 - 1), abs=TOLERANCE)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """The built-in model with a random, non-zero LoRA and head, saved as an adapter folder."""
    from lora_rm import add_lora, save_adapter

    folder = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = add_lora(builtin_model(builtin_tokenizer()), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.5 if "score" in name else 0.05)
    save_adapter(model, folder)
    return folder


@pytest.fixture(scope="module")
def rewards_alone(adapter):
    """Each answer scored alone, as a chat (the built-in tokenizer has a template): the rows' mapping, undone."""
    from lora_rm import load_adapter

    tokenizer = builtin_tokenizer()
    model = load_adapter(builtin_model(tokenizer), adapter).eval()

    @torch.no_grad()
    def score(prompt: str, answers: list[str]) -> list[float]:
        user = [{"role": "user", "content": prompt}]
        return [model(input_ids=torch.tensor([encode_text(tokenizer, user, [{"role": "assistant", "content": a}])]))
                .logits.item() for a in answers]

    return score


def test_rewardbench2_rows_map_to_k_way_rows_end_to_end(adapter, rewards_alone, tmp_path, capsys):
    """`lora-rm eval --benchmark rewardbench2 DATA` scores each reward-bench-2 row as one K-way row, chosen first."""
    rows = v2_rows()
    data = write_jsonl(tmp_path / "rb2.jsonl", rows)
    cli.main(["eval", "--adapter", str(adapter), "--benchmark", "rewardbench2", data, "--max-length", "32"])
    metrics = json.loads(capsys.readouterr().out)
    official = metrics["rewardbench2"]
    assert metrics["n_rows"] == len(rows) and metrics["n_responses"] == sum(r["total_completions"] for r in rows)
    expected = [rewards_alone(row["prompt"], row["chosen"] + row["rejected"]) for row in rows]
    for subset in rewardbench.V2_SUBSETS:
        mine = [i for i, row in enumerate(rows) if row["subset"] == subset]
        if subset == "Ties":
            prompts = rewardbench.ties_prompts([expected[i] for i in mine], [rows[i]["id"] for i in mine],
                                               [rows[i]["num_correct"] for i in mine])
            score = rewardbench.ties_score(prompts, torch.ones(1, len(prompts["has_ref"]), dtype=torch.float64))
            assert official["subsets"][subset]["score"] == pytest.approx(score.item(), abs=1e-6)
        else:
            results = [rewardbench.best_of_n_result(expected[i]) for i in mine]
            assert official["subsets"][subset]["score"] == pytest.approx(sum(results) / len(mine), abs=1e-6)
        assert official["subsets"][subset]["n_rows"] == len(mine)
    top1 = np.mean([min(e[: row["num_correct"]]) > max(e[row["num_correct"]:])
                    for e, row in zip(expected, rows, strict=True)])
    assert metrics["top1_accuracy"] == pytest.approx(top1)


def test_rewardbench_v1_with_prior_sets_from_a_folder(adapter, rewards_alone, tmp_path, capsys):
    """reward-bench rows and pref-test-sets rows (message-list prompts) in one folder: every section and Prior Sets."""
    core, prior = v1_rows()
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "reward-bench.jsonl", core)
    write_jsonl(tmp_path / "data" / "pref-test-sets.jsonl", prior)
    cli.main(["eval", "--adapter", str(adapter), "--benchmark", "rewardbench", "--dataset", str(tmp_path / "data"),
              "--max-length", "32"])
    metrics = json.loads(capsys.readouterr().out)
    official = metrics["rewardbench"]
    assert official["complete"] and set(official["sections"]) == set(rewardbench.SUBSET_MAPPING)
    assert metrics["n_pairs"] == len(core) + len(prior) and "accuracy_ci" in metrics
    rows = core + prior
    chosen, rejected = zip(*[rewards_alone(r["prompt"] if isinstance(r["prompt"], str) else
                                           r["prompt"][0]["content"], [r["chosen"], r["rejected"]]) for r in rows],
                           strict=True)
    recomputed = rewardbench.v1_report(torch.tensor(chosen), torch.tensor(rejected), [1] * len(rows), [1] * len(rows),
                                       [r["subset"] for r in rows])
    assert official["overall"]["score"] == pytest.approx(recomputed["overall"]["score"], abs=1e-6)
    assert official["prior_sets"]["score"] == pytest.approx(recomputed["prior_sets"]["score"], abs=1e-6)


@pytest.mark.parametrize("change, message", [
    (lambda rows: [row.pop("num_correct") for row in rows], "lacks ['num_correct']"),
    (lambda rows: rows[0].update(subset="Chat"), "not RewardBench 2's"),
    (lambda rows: rows[0].update(num_correct=2), "num_correct is 2 but chosen holds 1"),
    (lambda rows: rows[-1].update(id="7"), "a Ties row's id must be 'ref:N' or 'tied:N'"),
    (lambda rows: rows[-1].update(id="ref:x:3"), "a Ties row's id must be 'ref:N' or 'tied:N'"),
])
def test_bad_benchmark_rows_are_one_line_errors(adapter, tmp_path, capsys, change, message):
    rows = v2_rows()
    change(rows)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--adapter", str(adapter), "--benchmark", "rewardbench2",
                  write_jsonl(tmp_path / "bad.jsonl", rows)])
    assert message in str(exit_info.value)


def test_benchmark_flags_that_cannot_apply_are_usage_errors(tmp_path):
    for flags in (["--sections", "s.json"], ["--skip-bad-rows"], [], ["--rows", "0:-10"], ["--max-rows", "5"]):
        data = [] if flags == [] else ["data.jsonl"]
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["eval", "--adapter", str(tmp_path), "--benchmark", "rewardbench", *data, *flags])
        assert exit_info.value.code == 2


def test_a_row_over_max_length_is_an_error_not_a_skip(adapter, tmp_path, capsys):
    data = write_jsonl(tmp_path / "rb2.jsonl", v2_rows())
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--adapter", str(adapter), "--benchmark", "rewardbench2", data, "--max-length", "6"])
    assert "scores every row" in str(exit_info.value) and "truncate_left" in str(exit_info.value)
    cli.main(["eval", "--adapter", str(adapter), "--benchmark", "rewardbench2", data, "--max-length", "6",
              "--length-policy", "truncate_left"])
    assert json.loads(capsys.readouterr().out)["rewardbench2"]["complete"]
