"""The reward report: every PNG is written, metrics.json carries the length-bias numbers, matplotlib stays optional."""

import importlib
import json
import sys

import pytest
import torch

from lora_rm.eval_stats import length_metrics
from lora_rm.loss import preference_metrics
from lora_rm.plots import length_buckets, write_report
from lora_rm.run_log import read_log

PLOTS = ["rewards_hist.png", "accuracy_by_length.png", "reward_vs_length.png"]


def synthetic_pairs(n: int = 60) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Rewards that prefer chosen a little and grow with length: a mildly length-biased model."""
    lengths_chosen = torch.randint(10, 200, (n,))
    lengths_rejected = torch.randint(10, 200, (n,))
    chosen = 0.5 + 0.01 * lengths_chosen + torch.randn(n)
    rejected = 0.01 * lengths_rejected + torch.randn(n)
    return chosen, rejected, lengths_chosen.tolist(), lengths_rejected.tolist()


def assert_png(path) -> None:
    assert path.exists(), path
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), path


def test_writes_every_plot_and_the_metrics(tmp_path):
    chosen, rejected, lengths_chosen, lengths_rejected = synthetic_pairs()
    metrics = {**preference_metrics(chosen, rejected), "n_pairs": 60, "reward_stats": {"mean": 0.1, "std": 1.0}}
    paths = write_report(tmp_path / "report", chosen, rejected, lengths_chosen, lengths_rejected, metrics)

    assert [path.name for path in paths] == ["metrics.json", *PLOTS]
    for path in paths[1:]:
        assert_png(path)
    assert not (tmp_path / "report" / "training_curves.png").exists()
    written = json.loads(paths[0].read_text())
    assert {key: written[key] for key in metrics} == metrics  # the inputs, nested reward_stats included
    assert written["length_correlation"] > 0.3  # the bias built into synthetic_pairs is visible
    assert written["n_longer_chosen"] + written["n_shorter_chosen"] <= 60


def test_length_numbers_on_a_constructed_case(tmp_path):
    # reward == length exactly: r = 1, and the model is right exactly when chosen is the longer side.
    lengths_chosen = torch.tensor([10, 50, 30, 80, 20, 40, 40])
    lengths_rejected = torch.tensor([20, 40, 60, 10, 20, 70, 30])
    chosen, rejected = lengths_chosen.float(), lengths_rejected.float()
    paths = write_report(tmp_path, chosen, rejected, lengths_chosen, lengths_rejected, {"accuracy": 3 / 7})

    written = json.loads(paths[0].read_text())
    assert written["accuracy"] == 3 / 7
    assert written["length_correlation"] == pytest.approx(1.0)
    assert written["accuracy_longer_chosen"] == 1.0
    assert written["accuracy_shorter_chosen"] == 0.0
    assert (written["n_longer_chosen"], written["n_shorter_chosen"]) == (3, 3)  # the 20-vs-20 pair is neither


def test_length_metrics_against_torch_corrcoef():
    chosen, rejected, lengths_chosen, lengths_rejected = synthetic_pairs()
    lengths_chosen, lengths_rejected = torch.tensor(lengths_chosen).float(), torch.tensor(lengths_rejected).float()
    numbers = length_metrics(chosen, rejected, lengths_chosen, lengths_rejected)
    stacked = torch.stack([torch.cat([chosen, rejected]), torch.cat([lengths_chosen, lengths_rejected])])
    assert numbers["length_correlation"] == pytest.approx(torch.corrcoef(stacked)[0, 1].item(), abs=1e-6)
    longer = lengths_chosen > lengths_rejected
    assert numbers["accuracy_longer_chosen"] == pytest.approx((chosen[longer] > rejected[longer]).float().mean().item())


def test_undefined_numbers_are_null_not_nan():
    same = torch.ones(4)
    numbers = length_metrics(same, same, same, same)
    assert numbers["length_correlation"] is None
    assert numbers["accuracy_longer_chosen"] is None and numbers["accuracy_shorter_chosen"] is None


def test_length_buckets_are_quantiles_and_keep_ties_together():
    buckets = length_buckets(torch.arange(100).float(), n_buckets=4)
    assert torch.bincount(buckets).tolist() == [25, 25, 25, 25]
    tied = length_buckets(torch.tensor([5.0] * 8 + [9.0, 10.0]), n_buckets=5)
    assert len(set(tied[:8].tolist())) == 1


def test_training_curves_only_with_a_log(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [
        {"step": 1, "loss": 0.69, "accuracy": 0.5, "lr": 1e-4},
        {"step": 2, "loss": 0.60, "accuracy": 0.7},
        {"step": 2, "eval_accuracy": 0.6, "eval_mean_margin": 0.1, "eval_reward_stats": {"mean": 0, "std": 1}},
        {"note": "a line without step or metrics"},
    ]
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    chosen, rejected, lengths_chosen, lengths_rejected = synthetic_pairs(20)
    paths = write_report(tmp_path / "out", chosen, rejected, lengths_chosen, lengths_rejected, {}, log_path=log)

    assert paths[-1].name == "training_curves.png"
    assert_png(paths[-1])


def test_a_partial_last_log_line_is_skipped_with_a_warning(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 0.7}) + '\n{"step": 2, "lo')  # a run still writing its log
    with pytest.warns(UserWarning, match="log.jsonl:2 is not JSON"):
        assert read_log(log) == [{"step": 1, "loss": 0.7}]


def test_mismatched_or_non_finite_inputs_are_refused(tmp_path):
    chosen, rejected, lengths_chosen, lengths_rejected = synthetic_pairs(10)
    with pytest.raises(ValueError, match="lengths_rejected has 9 values"):
        write_report(tmp_path, chosen, rejected, lengths_chosen, lengths_rejected[:9], {})
    chosen[3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        write_report(tmp_path, chosen, rejected, lengths_chosen, lengths_rejected, {})


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    importlib.reload(sys.modules["lora_rm.plots"])  # the module itself imports without matplotlib
    chosen, rejected, lengths_chosen, lengths_rejected = synthetic_pairs(10)
    with pytest.raises(ImportError, match=r"pip install 'lora-rm\[plot\]'"):
        write_report(tmp_path / "out", chosen, rejected, lengths_chosen, lengths_rejected, {})
    assert not (tmp_path / "out").exists()  # nothing half-written
