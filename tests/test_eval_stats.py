"""Evaluation as the field reports it: per subset beside length-only rules, sections, bootstrap intervals, several
eval datasets during training and TensorBoard logs."""

import json
import random
import sys

import pytest
import torch
from runs import crash_at_micro_batch, read_log, tiny_run

from lora_rm.cli import build_parser, main, report_command, train_config_from_args
from lora_rm.config import LoraConfig, TrainConfig
from lora_rm.eval_stats import pair_report, read_sections
from lora_rm.train import train

# Six pairs in two subsets, unequal sizes so that count-weighted and unweighted means differ.
CHOSEN = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 5.0, 1.0, 1.0])
REJECTED = torch.tensor([0.0, 3.0, 1.0, 0.0, 1.0, 4.0, 2.0, 0.0])
LENGTHS_CHOSEN = [5, 3, 7, 4, 4, 9, 2, 6]
LENGTHS_REJECTED = [4, 3, 2, 6, 4, 1, 3, 6]
SUBSETS = ["a", "a", "a", "b", "b", "b", "b", "b"]


def test_per_subset_numbers_match_a_hand_count():
    report = pair_report(CHOSEN, REJECTED, LENGTHS_CHOSEN, LENGTHS_REJECTED, SUBSETS, {"S": ["a", "b"], "T": ["b"]})
    a, b = report["per_subset"]["a"], report["per_subset"]["b"]
    # a: model right on pairs 0, 2; longer chosen on 0, 2; shorter chosen on none; lengths tie on 1
    assert (a["n_pairs"], a["accuracy"], a["longer_wins_accuracy"], a["shorter_wins_accuracy"]) == (3, 2 / 3, 2 / 3, 0)
    assert (a["tie_rate"], a["length_tie_rate"]) == (0, 1 / 3)
    # b: model right on 5, 7, tie on 3; longer chosen on 5; shorter chosen on 3, 6; lengths tie on 4, 7
    assert (b["n_pairs"], b["accuracy"], b["longer_wins_accuracy"], b["shorter_wins_accuracy"]) == (5, 2 / 5, 1 / 5,
                                                                                                    2 / 5)
    assert (b["tie_rate"], b["length_tie_rate"]) == (1 / 5, 2 / 5)
    # equal lengths are right for neither rule: the three shares add up to one
    assert b["longer_wins_accuracy"] + b["shorter_wins_accuracy"] + b["length_tie_rate"] == pytest.approx(1)
    macro = report["macro_average"]
    assert macro["accuracy"] == pytest.approx((2 / 3 + 2 / 5) / 2)
    assert macro["longer_wins_accuracy"] == pytest.approx((2 / 3 + 1 / 5) / 2)
    # a section weights its subsets by pairs (RewardBench): S holds every pair, so it is the pooled accuracy 4/8
    section = report["per_section"]["S"]
    assert (section["n_pairs"], section["accuracy"], section["shorter_wins_accuracy"]) == (8, 4 / 8, 2 / 8)
    assert report["per_section"]["T"]["accuracy"] == pytest.approx(2 / 5)
    assert report["section_average"]["accuracy"] == pytest.approx((4 / 8 + 2 / 5) / 2)
    assert report["longer_wins_accuracy"] == 3 / 8 and report["shorter_wins_accuracy"] == 2 / 8
    assert report["length_tie_rate"] == 3 / 8


def test_intervals_hold_the_estimate_shrink_with_n_and_repeat():
    def report_of(n):
        right = torch.arange(n) % 10 < 7  # accuracy 0.7 at every n
        chosen, rejected = right.float(), torch.zeros(n)
        return pair_report(chosen, rejected, [2] * n, [1] * n, ["x"] * n)

    small, large = report_of(50), report_of(5000)
    for report in (small, large):
        for entry in (report["per_subset"]["x"], report["macro_average"]):
            low, high = entry["accuracy_ci"]
            assert low < 0.7 < high
            assert entry["longer_wins_accuracy_ci"] == [1.0, 1.0]  # a rule right on every pair has no spread
        low, high = report["accuracy_ci"]
        assert low < 0.7 < high
    width = {n: r["accuracy_ci"][1] - r["accuracy_ci"][0] for n, r in ((50, small), (5000, large))}
    assert width[5000] < width[50] / 5  # ~1/sqrt(n): 10x narrower
    assert 0.2 < width[50] < 0.3  # normal approximation: 2 * 1.96 * sqrt(0.21 / 50) = 0.25
    assert report_of(50) == small  # fixed seed


def test_sections_need_subsets_and_a_readable_file(tmp_path):
    with pytest.raises(ValueError, match="needs a 'subset' column"):
        pair_report(CHOSEN, REJECTED, LENGTHS_CHOSEN, LENGTHS_REJECTED, None, {"S": ["a"]})
    with pytest.raises(ValueError, match="none of section 'S'"):
        pair_report(CHOSEN, REJECTED, LENGTHS_CHOSEN, LENGTHS_REJECTED, SUBSETS, {"S": ["typo"]})
    with pytest.raises(ValueError, match=r"pairs \[1\] have no subset"):
        pair_report(CHOSEN, REJECTED, LENGTHS_CHOSEN, LENGTHS_REJECTED, ["a", None, *SUBSETS[2:]])
    path = tmp_path / "sections.json"
    path.write_text(json.dumps({"S": "a"}))
    with pytest.raises(ValueError, match="JSON object of section -> list of subset names"):
        read_sections(path)
    path.write_text(json.dumps({"S": ["a", "b"]}))
    assert read_sections(path) == {"S": ["a", "b"]}


def arithmetic_rows(n: int, seed: int) -> list[dict]:
    """Built-in-vocabulary pairs; odd rows have a rejected side one token longer, subsets by row number mod 3."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        wrong = (a + b + 1 + rng.randrange(5)) % 19
        rejected = f" {wrong} {wrong}" if i % 2 else f" {wrong}"
        rows.append({"prompt": f"What is {a} + {b} ?", "chosen": f" {a + b}", "rejected": rejected,
                     "subset": "short" if i % 3 else "long"})
    return rows


@pytest.fixture(scope="module")
def two_eval_run(tmp_path_factory):
    """A 4-step built-in run with two eval files and TensorBoard logging."""
    folder = tmp_path_factory.mktemp("two_eval")
    for name, seed in (("alpha", 1), ("beta", 2)):
        (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(row) for row in arithmetic_rows(24, seed)))
    config = TrainConfig(
        output=str(folder / "run"), max_rows=80, max_steps=4, batch_size=4, max_length=32, log_every=1,
        eval_every=2, progress=False, eval_dataset=[str(folder / "alpha.jsonl"), str(folder / "beta.jsonl")],
        report_to="tensorboard", lora=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    return folder, train(config)


def test_several_eval_datasets_are_logged_apart(two_eval_run):
    folder, final = two_eval_run
    records = [json.loads(line) for line in (folder / "run/log.jsonl").read_text().splitlines()]
    for name in ("alpha", "beta"):
        evals = [r for r in records if f"eval_{name}_accuracy" in r]
        assert [r["step"] for r in evals] == [2, 4]
        assert all(r[f"eval_{name}_n_pairs"] == 24 for r in evals)
    assert not any("eval_accuracy" in r for r in records)  # no unnamed eval key that one could mistake for either
    saved = json.loads((folder / "run/eval_metrics.json").read_text())
    assert set(saved["eval_datasets"]) == {"alpha", "beta"}
    assert saved["accuracy"] == saved["eval_datasets"]["alpha"]["accuracy"]  # the first at the top, as with one
    assert final["eval_datasets"]["beta"]["accuracy"] == records[-1]["eval_beta_accuracy"]


def test_tensorboard_scalars_are_readable(two_eval_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, _ = two_eval_run
    records = [json.loads(line) for line in (folder / "run/log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(folder / "run"))
    events.Reload()
    losses = [(event.step, event.value) for event in events.Scalars("train/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in records if "loss" in r]
    beta = [(event.step, event.value) for event in events.Scalars("eval_beta/accuracy")]
    assert beta == [(r["step"], pytest.approx(r["eval_beta_accuracy"])) for r in records if "eval_beta_accuracy" in r]
    assert "eval_alpha/reward_stats/std" in events.Tags()["scalars"]


def crashed_and_resumed(output, monkeypatch, crash_at: int) -> list[tuple[int, float]]:
    """TensorBoard's (step, train/loss) points of a tiny run that crashed at micro-batch crash_at and resumed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    undo = crash_at_micro_batch(monkeypatch, crash_at)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(output, report_to="tensorboard"))
    undo()
    train(tiny_run(output, report_to="tensorboard", resume=True))
    events = EventAccumulator(str(output))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars("train/loss")]


def test_tensorboard_keeps_one_point_per_step_after_a_crash_and_resume(tmp_path, monkeypatch):
    """Steps 4-5 ran, were logged, then the run crashed; the resume from step 3 used to log them a second time.
    A crash before the first checkpoint (in step 3) resumes from step 0 and redoes steps 1-2."""
    for name, crash_at in (("after_checkpoint", 11), ("before_checkpoint", 5)):  # 2 micro-batches a step
        points = crashed_and_resumed(tmp_path / name, monkeypatch, crash_at)
        assert [step for step, _ in points] == [1, 2, 3, 4, 5, 6], name
        losses = {r["step"]: r["loss"] for r in read_log(tmp_path / name) if "loss" in r}
        assert [value for _, value in points] == pytest.approx([losses[step] for step, _ in points]), name


def test_missing_tensorboard_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    with pytest.raises(ImportError, match=r"lora-rm\[tensorboard\]"):
        train(TrainConfig(output=str(tmp_path / "run"), max_rows=40, max_steps=1, report_to="tensorboard"))
    assert not (tmp_path / "run").exists()  # it failed before touching the output folder


def test_eval_dataset_flag_repeats(tmp_path):
    parser = build_parser()
    once = train_config_from_args(parser.parse_args(["train", "--eval-dataset", "a.jsonl"]))
    twice = train_config_from_args(parser.parse_args(["train", "--eval-dataset", "a.jsonl", "--eval-dataset", "b"]))
    assert once.eval_dataset == "a.jsonl"  # train_config.json holds a string, as before
    assert twice.eval_dataset == ["a.jsonl", "b"]
    assert "--dataset a.jsonl" in report_command(twice)  # the report is written for the first


def test_eval_cli_reports_subsets_sections_and_chart(two_eval_run, tmp_path, capsys):
    folder, _ = two_eval_run
    sections = tmp_path / "sections.json"
    sections.write_text(json.dumps({"all": ["long", "short"]}))
    main(["eval", "--adapter", str(folder / "run"), "--dataset", str(folder / "alpha.jsonl"), "--split", "train",
          "--max-length", "32", "--sections", str(sections), "--report", str(tmp_path / "report")])
    metrics = json.loads(capsys.readouterr().out)
    rows = arithmetic_rows(24, 1)
    for name in ("long", "short"):
        members = [i for i, row in enumerate(rows) if row["subset"] == name]
        entry = metrics["per_subset"][name]
        assert entry["n_pairs"] == len(members)
        assert entry["longer_wins_accuracy"] == 0  # the chosen side is never the longer one
        assert entry["shorter_wins_accuracy"] == sum(i % 2 for i in members) / len(members)
        assert entry["accuracy_ci"][0] <= entry["accuracy"] <= entry["accuracy_ci"][1]
    assert metrics["per_section"]["all"]["accuracy"] == pytest.approx(metrics["accuracy"])  # every pair: pooled
    assert (tmp_path / "report/subset_accuracy.png").stat().st_size > 0


def test_a_row_without_a_subset_is_named_before_scoring(tmp_path, monkeypatch):
    """It used to be reported after scoring, by the index of a kept pair ("pairs [1] have no subset")."""
    import lora_rm.evaluate as evaluate_module
    from lora_rm.builtin import builtin_model, builtin_tokenizer
    from lora_rm.data import load_preference_dataset

    rows = arithmetic_rows(4, 1)
    rows[2]["subset"] = None
    rows[3]["subset"] = ""
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    monkeypatch.setattr(evaluate_module, "rewards_for_pairs", lambda *args, **kwargs: pytest.fail("scored"))
    tokenizer = builtin_tokenizer()
    message = (r"rows\.jsonl line 3: no subset \(2 rows lack one: .*rows\.jsonl line 3, .*rows\.jsonl line 4\); "
               r"every row needs one when the data has a subset column")
    with pytest.raises(ValueError, match=message):
        evaluate_module.evaluate_dataset(builtin_model(tokenizer), tokenizer,
                                         load_preference_dataset(str(tmp_path / "rows.jsonl")), 32)
