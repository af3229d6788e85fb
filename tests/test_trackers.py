"""--report-to wandb / mlflow (and tensorboard beside them): the values of log.jsonl at its steps, the run's settings,
and a failed status when a run crashes or diverges. W&B runs offline and MLflow on a local file store; both are read
back from what they wrote."""

import dataclasses
import json
import struct
import sys

import pytest
from runs import FLAGS, TWO, crash_at_micro_batch, read_log, tiny_run, torchrun

from lora_rm import distributed, trackers
from lora_rm.cli import build_parser, train_config_from_args
from lora_rm.config import TrainConfig
from lora_rm.health import TrainingDiverged
from lora_rm.run_log import scalar_tags
from lora_rm.train import train

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch):
    """W&B offline in tmp_path/wandb, MLflow in a file store at tmp_path/mlruns; (tmp_path, MlflowClient)."""
    import wandb
    from mlflow.tracking import MlflowClient

    wandb.teardown()  # W&B reads its environment once per process, at its first run: start afresh

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store for tests like this one
    yield tmp_path, MlflowClient()
    wandb.teardown()


def wandb_records(folder):
    """Every record of the one offline W&B run under folder: the .wandb file is a LevelDB-style log (a 7-byte
    header ':W&B', 0xBEE1, version; then 32 KiB blocks of chunks: crc32c, length, type) of protobuf Records."""
    import wandb
    from wandb.proto.wandb_internal_pb2 import Record

    wandb.teardown()  # stops W&B's service process, so that everything it buffered is in the file
    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, payload, records = 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little room for a chunk header: the block's tail is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        if kind == 0:  # zero padding
            break
        payload += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def wandb_history(records) -> dict[int, dict[str, float]]:
    """step -> {tag: value} of the run's history rows."""
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(row)
    rows = {step: {k: v for k, v in row.items() if not k.startswith("_")} for step, row in history.items()}
    return {step: row for step, row in rows.items() if row}  # W&B's own rows (_runtime, ...) left out


def wandb_config(records) -> dict:
    config = {}
    for record in records:  # the run record's config at wandb.init, then any later updates
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config.update({item.key: json.loads(item.value_json) for item in updates})
    return {k: v for k, v in config.items() if not k.startswith("_")}


def wandb_exit_code(records) -> int:
    (code,) = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    return code


def mlflow_run(client):
    (experiment,) = [e for e in client.search_experiments() if e.name == trackers.PROJECT]
    (run,) = client.search_runs([experiment.experiment_id])
    return run


def expected_tags(output) -> dict[int, dict[str, float]]:
    """step -> the numbers of log.jsonl's records at that step, as tags."""
    expected = {}
    for record in read_log(output):
        expected.setdefault(record["step"], {}).update(scalar_tags(record, ("eval",)))
    return expected


def test_every_tracker_gets_the_log_values_at_their_steps_and_the_settings(offline_trackers):
    folder, client = offline_trackers
    config = tiny_run(folder / "run", max_steps=4, save_every=None, eval_every=2,
                      report_to="tensorboard,wandb,mlflow")
    train(config)
    expected = expected_tags(folder / "run")
    assert sorted(expected) == [1, 2, 3, 4] and "eval/accuracy" in expected[2] and "train/loss" in expected[2]

    records = wandb_records(folder)
    history = wandb_history(records)
    assert sorted(history) == sorted(expected)
    for step, tags in expected.items():
        assert history[step] == pytest.approx(tags, rel=1e-12), step
    settings = json.loads(json.dumps(dataclasses.asdict(config)))
    assert wandb_config(records) == settings
    assert wandb_exit_code(records) == 0

    run = mlflow_run(client)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params == trackers.flat_settings(config)
    assert run.data.params["lora.r"] == "4"
    for tag in {tag for tags in expected.values() for tag in tags}:
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)}
        assert logged == pytest.approx({step: tags[tag] for step, tags in expected.items() if tag in tags}), tag


@pytest.mark.slow
def test_a_diverged_and_a_crashed_run_close_their_trackers_as_failed(offline_trackers, monkeypatch):
    folder, client = offline_trackers
    with pytest.raises(TrainingDiverged, match="loss is nan at step 3"):  # lr 1e38 (as test_run_safety)
        train(tiny_run(folder / "diverged", lr=1e38, warmup_ratio=0.5, report_to="wandb,mlflow"))
    records = wandb_records(folder)
    assert wandb_exit_code(records) == 1
    logged = [record["step"] for record in read_log(folder / "diverged")]
    assert logged == [1, 2]  # what ran before the stop; the diverged step itself is not logged
    assert sorted(wandb_history(records)) == logged
    run = mlflow_run(client)
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == logged

    client.delete_run(run.info.run_id)
    crash_at_micro_batch(monkeypatch, 5)  # step 3's first micro-batch: Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(folder / "crashed", report_to="mlflow"))
    (crashed,) = [r for r in client.search_runs([run.info.experiment_id]) if r.info.run_name == "crashed"]
    assert crashed.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(crashed.info.run_id, "train/loss")] == [1, 2]


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_tracker_package_names_its_extra(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError
    with pytest.raises(ImportError, match=rf"--report-to {name} needs the {name} package: .*lora-rm\[{name}\]"):
        train(TrainConfig(output=str(tmp_path / "run"), max_rows=40, max_steps=1, report_to=f"tensorboard,{name}"))
    assert not (tmp_path / "run").exists()  # it failed before touching the output folder


def test_report_to_takes_several_names_comma_separated(tmp_path):
    args = build_parser().parse_args(["train", "--output", str(tmp_path), "--report-to", "tensorboard,wandb,mlflow"])
    config = train_config_from_args(args)
    assert trackers.report_targets(config.report_to) == ["tensorboard", "wandb", "mlflow"]
    assert trackers.report_targets(["wandb", "none"]) == ["wandb"]
    with pytest.raises(ValueError, match="report_to must be one or more of .*comma-separated, got 'wandb,comet'"):
        TrainConfig(report_to="wandb,comet")


@pytest.mark.slow
def test_under_torchrun_one_tracker_run_logs_what_rank_zero_logs(offline_trackers):
    folder, client = offline_trackers
    torchrun("-m", "lora_rm", "train", "--output", str(folder / "run"), *FLAGS, *TWO, "--report-to", "mlflow")
    run = mlflow_run(client)  # exactly one run: rank 1 opened none
    assert run.info.status == "FINISHED"
    logged = [(r["step"], r["loss"]) for r in read_log(folder / "run") if "loss" in r]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == logged
    assert "Run under torchrun, 2 processes." in (folder / "run" / "README.md").read_text()


def test_only_rank_zero_opens_trackers(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    assert trackers.open_trackers(TrainConfig(report_to="tensorboard,wandb,mlflow"), tmp_path) == []
    assert not list(tmp_path.iterdir())
