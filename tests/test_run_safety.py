"""Run safety: one run per output folder, resume refuses changed settings, divergence and collapse stop with only good
checkpoints kept, torn logs and corrupt checkpoints do not block a resume, files follow the umask."""

import json
import os
import socket
import stat
import subprocess
import sys

import pytest
import torch
from runs import assert_replays, crash_at_micro_batch, read_log, tiny_run, train_losses, write_jsonl

import lora_rm.checkpoint as checkpoint_module
import lora_rm.train as train_module
from lora_rm.builtin import builtin_model, builtin_tokenizer
from lora_rm.checkpoint import list_checkpoints, save_checkpoint
from lora_rm.cli import main
from lora_rm.config import LoraConfig
from lora_rm.health import COLLAPSE_STEPS, TrainingDiverged
from lora_rm.inject import add_lora
from lora_rm.run_folder import LOCK_NAME
from lora_rm.train import train


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted six-step run every resumed run must replay."""
    output = tmp_path_factory.mktemp("safety") / "full"
    train(tiny_run(output))
    return output


def write_lock(output, pid):
    output.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": socket.gethostname(), "started": "2024-01-01T00:00:00+00:00"}
    (output / LOCK_NAME).write_text(json.dumps(holder))


# -- item 2: one run per output folder


def test_second_run_into_a_locked_output_stops_at_once_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(tmp_path, holder.pid)
        with pytest.raises(FileExistsError, match=f"in use by another run: pid {holder.pid} on host .* started 2024"):
            train(tiny_run(tmp_path))
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # nothing written, the lock untouched
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_held_during_the_run_and_released_after(tmp_path, monkeypatch):
    seen = []
    real_save = train_module.save_checkpoint

    def save_and_look(*args, **kwargs):
        seen.append(json.loads((tmp_path / LOCK_NAME).read_text()))
        return real_save(*args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", save_and_look)
    train(tiny_run(tmp_path))
    assert [holder["pid"] for holder in seen] == [os.getpid(), os.getpid()]
    assert not (tmp_path / LOCK_NAME).exists()
    restore = crash_at_micro_batch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):  # a failing run releases it too
        train(tiny_run(tmp_path, overwrite=True))
    restore()
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_process_is_reported_and_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path, dead.pid)
    train(tiny_run(tmp_path, max_steps=1))
    assert f"taking over the stale lock {tmp_path / LOCK_NAME}: pid {dead.pid}" in capsys.readouterr().out
    assert len(train_losses(tmp_path)) == 1 and not (tmp_path / LOCK_NAME).exists()


# -- item 3: resume refuses changed settings


def test_resume_refuses_changed_settings_and_records_what_ran(tmp_path):
    train(tiny_run(tmp_path, max_steps=3))
    saved = (tmp_path / "train_config.json").read_text()
    with pytest.raises(ValueError, match=r"changed settings \(lr: 0.001 -> 0.5\)"):
        train(tiny_run(tmp_path, max_steps=3, lr=0.5, resume=True))
    lora = dict(r=8, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear")
    with pytest.raises(ValueError, match=r"\(lora.r: 4 -> 8, seed: 42 -> 7\)"):
        train(tiny_run(tmp_path, max_steps=3, seed=7, lora=LoraConfig(**lora), resume=True))
    with pytest.raises(ValueError, match="the saved run took 8 pairs per step, this one 4"):
        train(tiny_run(tmp_path, max_steps=3, batch_size=2, resume=True))  # may change only with the world size
    assert (tmp_path / "train_config.json").read_text() == saved  # a refused run writes nothing
    assert len(train_losses(tmp_path)) == 3

    train(tiny_run(tmp_path, max_steps=6, log_every=2, resume=True))  # extending a run is allowed
    written = json.loads((tmp_path / "train_config.json").read_text())
    assert (written["max_steps"], written["log_every"], written["lr"], written["resume"]) == (6, 2, 1e-3, True)
    assert [r["step"] for r in read_log(tmp_path) if "loss" in r] == [1, 2, 3, 4, 6]


# -- item 4: divergence and collapse


@pytest.mark.slow
def test_collapsed_model_stops_instead_of_exiting_zero(tmp_path):
    """lr 1e6: after one huge update every reward is 0 and the gradient norm 0; this used to finish 'successfully'."""
    with pytest.raises(TrainingDiverged, match=rf"collapsed: .* for {COLLAPSE_STEPS} consecutive steps \(4-8\).*"
                       r"update that led here was 1e\+06 \(peak --lr 1e\+06\)") as caught:
        # warmup_ratio 0.1: 2 warmup steps (ceil(1.2)), so step 2 updates with the peak lr
        train(tiny_run(tmp_path, lr=1e6, max_steps=12, warmup_ratio=0.1, save_every=1, keep_checkpoints=20))
    good = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in good] == ["step-000001", "step-000002"]
    assert f"The latest good checkpoint is {good[-1]}." in str(caught.value)
    assert (tmp_path / "checkpoints" / "diverged-step-000003").is_dir()  # set aside, not deleted
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_overflowing_update_stops_with_training_diverged(tmp_path):
    """lr 1e38: AdamW's step size overflows float32; this used to escape as a bare RuntimeError."""
    with pytest.raises(TrainingDiverged, match="update of step 2 overflowed.*1e\\+38.*There is no good checkpoint"):
        train(tiny_run(tmp_path, lr=1e38, warmup_ratio=0.1))  # 1 warmup step (ceil(0.6)): step 1 uses 1e38


def test_diverged_run_names_only_a_checkpoint_that_evaluates_finite(tmp_path, capsys):
    """lr 1e38 with warmup: step-2 is saved with finite but huge weights whose rewards are NaN; it used to be kept
    as the latest, with the error calling the folder 'the last good checkpoint'."""
    with pytest.raises(TrainingDiverged, match="loss is nan at step 3") as caught:
        train(tiny_run(tmp_path, lr=1e38, warmup_ratio=0.5, save_every=1))
    checkpoints = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-000001"]
    assert f"The latest good checkpoint is {checkpoints / 'step-000001'}." in str(caught.value)
    assert "diverged-step-000002" in str(caught.value)

    eval_flags = ["--max-rows", "24", "--max-length", "32"]
    main(["eval", "--adapter", str(checkpoints / "step-000001"), *eval_flags])
    good = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert 0 <= good["accuracy"] <= 1 and good["reward_stats"]["std"] >= 0

    # the set-aside checkpoint evaluates to NaN: strict JSON with null, a one-line error and exit 1
    with pytest.raises(SystemExit, match="^lora-rm: error: some metrics are NaN or inf") as exited:
        main(["eval", "--adapter", str(checkpoints / "diverged-step-000002"), *eval_flags])
    assert exited.value.code != 0
    line = capsys.readouterr().out.splitlines()[-1]
    metrics = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the printed JSON"))
    assert metrics["mean_reward"] is None and metrics["n_pairs"] == 23  # one of the 24 was trained on: left out


def test_keeping_one_checkpoint_never_prunes_the_last_verified_one(tmp_path):
    """keep_checkpoints=1 used to prune step-1 when step-2 was saved; step-2's weights then gave a NaN loss, so the
    error said there was no good checkpoint though step-1 had been verified."""
    with pytest.raises(TrainingDiverged, match="loss is nan at step 3") as caught:
        train(tiny_run(tmp_path, lr=1e38, warmup_ratio=0.5, save_every=1, keep_checkpoints=1))
    assert f"The latest good checkpoint is {tmp_path / 'checkpoints' / 'step-000001'}." in str(caught.value)


def test_final_metrics_that_are_not_finite_are_written_as_null_and_fail_the_run(tmp_path, monkeypatch):
    """eval_metrics.json at the end of training used to be written with a bare NaN (invalid JSON) and exit 0."""
    real_evaluate = train_module.evaluate

    def nan_margin(*args, **kwargs):
        return {**real_evaluate(*args, **kwargs), "mean_margin": float("nan")}

    monkeypatch.setattr(train_module, "evaluate", nan_margin)
    with pytest.raises(ValueError, match="final evaluation's metrics are NaN or inf"):
        train(tiny_run(tmp_path))
    written = json.loads((tmp_path / "eval_metrics.json").read_text(),
                         parse_constant=lambda name: pytest.fail(f"{name} in eval_metrics.json"))
    assert written["mean_margin"] is None and 0 <= written["accuracy"] <= 1


def test_non_finite_gradient_or_weights_stop_the_run(tmp_path, monkeypatch):
    real_clip = train_module.clip_gradients
    calls = {"n": 0}

    def inf_at_step_four(*args, **kwargs):
        calls["n"] += 1
        return torch.tensor(float("inf")) if calls["n"] == 5 else real_clip(*args, **kwargs)

    monkeypatch.setattr(train_module, "clip_gradients", inf_at_step_four)
    with pytest.raises(TrainingDiverged, match="gradient norm is inf at step 5; nothing was updated"):
        train(tiny_run(tmp_path / "grad"))
    monkeypatch.setattr(train_module, "clip_gradients", real_clip)

    real_step = train_module.optimizer_step

    def nan_weights_at_step_three(optimizer, scaler):
        real_step(optimizer, scaler)
        if optimizer.state_dict()["state"][0]["step"] == 3:
            optimizer.param_groups[1]["params"][0].data.fill_(float("nan"))

    monkeypatch.setattr(train_module, "optimizer_step", nan_weights_at_step_three)
    with pytest.raises(TrainingDiverged, match="update of step 3 left NaN or inf"):
        train(tiny_run(tmp_path / "weights"))
    assert list_checkpoints(tmp_path / "weights" / "checkpoints") == []  # step-3 held the NaN: never written


def test_save_checkpoint_never_writes_non_finite_weights(tmp_path):
    model = builtin_model(builtin_tokenizer())
    add_lora(model, tiny_run(tmp_path).lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with torch.no_grad():
        model.score.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="not writing checkpoint step-000004: 1 adapter/head tensors hold NaN or inf"):
        save_checkpoint(tmp_path / "checkpoints", 4, model, optimizer, {}, keep=2)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


# -- item 9: torn log, corrupt checkpoint, finished run, crash mid-checkpoint


def test_torn_last_log_line_does_not_block_resume(tmp_path, monkeypatch, capsys, full_run):
    restore = crash_at_micro_batch(monkeypatch, 9)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(tmp_path))
    restore()
    with (tmp_path / "log.jsonl").open("a") as log:
        log.write('{"step": 5, "epoch": 0.41, "lo')  # a kill mid-write
    train(tiny_run(tmp_path, resume=True))
    assert "dropping the torn last line 5 of" in capsys.readouterr().out
    assert_replays(tmp_path, full_run)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["optimizer.safetensors", "trainer_state.json", "adapter_model.safetensors"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, full_run, name):
    train(tiny_run(tmp_path))
    damaged = tmp_path / "checkpoints" / "step-000006" / name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # cut short by a kill
    train(tiny_run(tmp_path, resume=True))
    out = capsys.readouterr().out
    assert f"cannot resume from step-000006: checkpoint file {damaged}" in out or str(damaged) in out
    assert "resumed from step 3 (step-000003" in out
    assert_replays(tmp_path, full_run)
    assert len(train_losses(tmp_path)) == 6


@pytest.mark.slow
def test_no_loadable_checkpoint_is_a_clear_error(tmp_path):
    train(tiny_run(tmp_path))
    for path in list_checkpoints(tmp_path / "checkpoints"):
        (path / "trainer_state.json").write_text('{"step": ')
    with pytest.raises(ValueError, match=r"no checkpoint in .* can be loaded \(step-000006: .*; step-000003: "):
        train(tiny_run(tmp_path, resume=True))


def test_resuming_a_finished_run_adds_no_duplicate_records(tmp_path):
    train(tiny_run(tmp_path, eval_every=2))
    before = read_log(tmp_path)
    train(tiny_run(tmp_path, eval_every=2, resume=True))
    after = read_log(tmp_path)
    assert [r["step"] for r in after] == [r["step"] for r in before]
    assert sum("eval_accuracy" in r for r in after) == 3  # steps 2 and 4, and one final eval at 6


@pytest.mark.slow
def test_first_log_window_after_resume_says_how_many_steps_it_covers(tmp_path, monkeypatch):
    restore = crash_at_micro_batch(monkeypatch, 9)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(tmp_path, log_every=2))
    restore()
    train(tiny_run(tmp_path, log_every=2, resume=True))
    windows = [(r["step"], r["window_steps"]) for r in read_log(tmp_path) if "loss" in r]
    assert windows == [(2, 2), (4, 1), (6, 2)]  # step 4's loss averages step 4 alone: the run resumed at 3


@pytest.mark.slow
def test_crash_mid_checkpoint_still_replays_the_uninterrupted_run(tmp_path, monkeypatch, full_run):
    real_save_file, calls = checkpoint_module.save_file, {"n": 0}

    def crash_in_second_checkpoint(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # step-6's optimizer file: its adapter is already in the temporary folder
            raise KeyboardInterrupt
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", crash_in_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(tmp_path))
    monkeypatch.setattr(checkpoint_module, "save_file", real_save_file)
    partial = tmp_path / "checkpoints" / ".tmp-step-000006"
    assert (partial / "adapter_model.safetensors").exists() and not (partial / "optimizer.safetensors").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000003"]
    train(tiny_run(tmp_path, resume=True))
    assert_replays(tmp_path, full_run)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000003", "step-000006"]
    assert not partial.exists()


# -- item 10: files follow the umask


def test_every_file_the_run_writes_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        train(tiny_run(tmp_path))
    finally:
        os.umask(old)
    modes = {
        str(path.relative_to(tmp_path)): stat.S_IMODE(path.stat().st_mode)
        for path in tmp_path.rglob("*")
    }
    written = {"adapter_model.safetensors", "adapter_config.json", "log.jsonl", "train_config.json",
               "checkpoints/step-000006/optimizer.safetensors", "checkpoints/step-000006/rng_state.safetensors",
               "checkpoints/step-000006/adapter_model.safetensors", "checkpoints/step-000006/trainer_state.json"}
    assert written <= set(modes)
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o755 if (tmp_path / name).is_dir() else 0o644)}
    assert wrong == {}


def test_cli_resume_keeps_the_saved_settings_for_flags_not_given(tmp_path):
    """`lora-rm train --output DIR --resume` continues the run as started; a flag given is compared as a change."""
    output = tmp_path / "run"
    main(["train", "--output", str(output), "--max-rows", "80", "--max-steps", "2", "--batch-size", "4", "--r", "4",
          "--lr", "0.003", "--save-every", "1", "--no-progress"])
    main(["train", "--output", str(output), "--resume", "--max-steps", "4"])  # no other flag repeated
    written = json.loads((output / "train_config.json").read_text())
    assert (written["lr"], written["lora"]["r"], written["max_steps"], written["max_rows"]) == (0.003, 4, 4, 80)
    assert [r["step"] for r in read_log(output) if "loss" in r][-1] == 4
    with pytest.raises(SystemExit, match=r"changed settings \(lr: 0.003 -> 0.5\)"):
        main(["train", "--output", str(output), "--resume", "--lr", "0.5"])


def test_resume_on_a_folder_without_a_run_says_it_starts_a_new_one(tmp_path, capsys):
    """A preemptible job passes --resume from its first start: allowed, but said on stderr, never silent."""
    train(tiny_run(tmp_path / "new", max_steps=1, resume=True))
    assert (f"--resume: {tmp_path / 'new'} does not exist, so there is no run to resume; starting a new one there"
            in capsys.readouterr().err)
    assert list_checkpoints(tmp_path / "new" / "checkpoints")
    (tmp_path / "empty").mkdir()
    train(tiny_run(tmp_path / "empty", max_steps=1, resume=True))
    assert (f"--resume: {tmp_path / 'empty'} holds no run (no log.jsonl, adapter or checkpoints/); starting a new "
            "one there" in capsys.readouterr().err)


def test_resume_after_an_overwrite_run(tmp_path):
    """--overwrite is how a run started, not a setting: it is not saved, and an old folder that saved it resumes."""
    output = str(tmp_path / "run")
    flags = ["--max-rows", "80", "--batch-size", "4", "--lora-r", "4", "--save-every", "1", "--no-progress"]
    main(["train", "--output", output, *flags, "--max-steps", "1"])
    main(["train", "--output", output, *flags, "--max-steps", "1", "--overwrite"])
    assert "overwrite" not in json.loads((tmp_path / "run" / "train_config.json").read_text())
    main(["train", "--output", output, "--resume", "--max-steps", "2"])
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    (tmp_path / "run" / "train_config.json").write_text(json.dumps({**saved, "overwrite": True}))  # as older ones
    main(["train", "--output", output, "--resume", "--max-steps", "3"])
    assert [r["step"] for r in read_log(tmp_path / "run") if "loss" in r] == [1, 2, 3]


def test_sides_longer_than_the_models_positions_are_refused_before_training(tmp_path):
    """They used to end in an IndexError mid-training on a model with learned positions (the built-in model has 64)."""
    long_side = " ".join(["What is 1 + 2 ? 3"] * 12)
    rows = [{"chosen": long_side, "rejected": long_side.replace("? 3", f"? {4 + i}")} for i in range(10)]
    data_file = tmp_path / "long.jsonl"
    write_jsonl(data_file, rows)
    with pytest.raises(ValueError, match=r"the longest kept side has \d+ tokens, over the model's "
                                         r"max_position_embeddings \(64\); lower --max-length to 64 or less"):
        train(tiny_run(tmp_path / "run", dataset=str(data_file), max_rows=None, max_length=100))
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- Hardening 2: --overwrite deletes only what a run wrote


def test_overwrite_refuses_a_folder_holding_anything_but_a_run_and_deletes_nothing(tmp_path):
    output = tmp_path / "run"
    train(tiny_run(output, max_steps=1, report_to="tensorboard"))
    (output / "notes.txt").write_text("my notes")
    (output / "data").mkdir()
    (output / "data" / "pairs.jsonl").write_text("{}\n")
    (output / ".git").mkdir()
    (output / "checkpoints" / "keep.txt").write_text("mine")
    before = sorted(str(p.relative_to(output)) for p in output.rglob("*"))
    with pytest.raises(FileExistsError, match=r"--overwrite: .*run.* holds files no run writes \(\.git, "
                                              r"checkpoints/keep\.txt, data, notes\.txt\)"):
        train(tiny_run(output, max_steps=1, overwrite=True))
    assert sorted(str(p.relative_to(output)) for p in output.rglob("*")) == before
    for path in ("notes.txt", "data/pairs.jsonl", "checkpoints/keep.txt"):
        (output / path).unlink()
    (output / "data").rmdir()
    (output / ".git").rmdir()
    train(tiny_run(output, max_steps=1, overwrite=True))  # a run's own files (tensorboard's too) are replaced
    assert not list(output.glob("events.out.tfevents.*")) and len(train_losses(output)) == 1


@pytest.mark.parametrize("output", [".", "..", "./"])
def test_overwrite_refuses_the_current_folder_and_its_parents(tmp_path, monkeypatch, output):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("my notes")
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match="--overwrite .*the current folder"):
        train(tiny_run(output, max_steps=1, overwrite=True))
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]


def test_empty_output_is_refused(capsys):
    """`--output ""` (an unset shell variable, say) would mean the current folder."""
    with pytest.raises(ValueError, match="TrainConfig.output must be a folder's name, not empty"):
        tiny_run("")
    with pytest.raises(SystemExit):
        main(["train", "--output", "", "--overwrite"])
    assert "lora-rm: error: --output must be a folder's name, not empty" in capsys.readouterr().err


def test_resume_under_group_by_length_refuses_another_grad_accum_split(tmp_path):
    """Pairs are sorted by length in chunks of micro-batches, so 4 x 2 and 8 x 1 group other pairs: the adapter moved
    by 8.9e-3 (issue 23) instead of replaying. Refused, with the setting to keep."""
    train(tiny_run(tmp_path, max_steps=3, group_by_length=True))
    with pytest.raises(ValueError, match=r"--resume with --group-by-length: grad_accum 2 -> 1 changes which pairs "
                                         r"share a micro-batch .* keep --grad-accum 2"):
        train(tiny_run(tmp_path, max_steps=6, group_by_length=True, batch_size=8, grad_accum=1, resume=True))
    assert len(train_losses(tmp_path)) == 3
