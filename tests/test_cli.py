"""The `lora-rm` command end to end on the built-in task: train, eval, score, merge, and its refusals."""

import contextlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lora_rm import LoraConfig, add_lora, load_adapter, save_adapter
from lora_rm.builtin import builtin_model, builtin_preference_dataset, builtin_tokenizer
from lora_rm.cli import entry_point, main, read_score_inputs
from lora_rm.encode import encode_text
from lora_rm.evaluate import score_texts
from lora_rm.model_io import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]

TINY_TRAIN = ["--max-rows", "80", "--max-steps", "4", "--batch-size", "4", "--lora-r", "4", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A built-in reward model trained for four steps through the CLI; what it printed to stderr is kept beside it."""
    output = tmp_path_factory.mktemp("cli") / "run"
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        main(["train", "--output", str(output), *TINY_TRAIN])
    (output.parent / "stderr.txt").write_text(stderr.getvalue())
    return output


def lora_rm_command(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m lora_rm ...` in a fresh process, as a user runs it."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "lora_rm", *args], capture_output=True, text=True, env=environment,
                          timeout=120)


def test_train_writes_a_peft_adapter_and_refuses_to_overwrite(trained):
    assert (trained / "adapter_model.safetensors").exists() and (trained / "log.jsonl").exists()
    assert json.loads((trained / "adapter_config.json").read_text())["r"] == 4
    with pytest.raises(SystemExit, match="^lora-rm: error: .* already holds a run; pass --resume"):
        main(["train", "--output", str(trained), *TINY_TRAIN])


def test_eval_prints_one_json_line(trained, capsys):
    main(["eval", "--adapter", str(trained), "--max-rows", "24", "--max-length", "32"])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n_pairs"] == 23 and 0 <= metrics["accuracy"] <= 1  # one of the 24 was trained on: left out
    assert {"mean_margin", "tie_rate", "reward_stats"} <= set(metrics)


def test_score_reads_jsonl_and_plain_lines_and_matches_the_api(trained, tmp_path, capsys):
    inputs = tmp_path / "texts.jsonl"
    inputs.write_text('{"text": "What is 3 + 4 ? 7"}\nWhat is 3 + 4 ? 9\n42\n')
    main(["score", "--adapter", str(trained), "--input", str(inputs)])
    printed = [float(line) for line in capsys.readouterr().out.split()]
    tokenizer = builtin_tokenizer()
    model = load_adapter(builtin_model(tokenizer), trained).eval()
    expected = score_texts(model, tokenizer, ["What is 3 + 4 ? 7", "What is 3 + 4 ? 9", "42"])
    assert printed == pytest.approx(expected, abs=1e-5)
    inputs.write_text('{"prompt": "no text field"}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_score_inputs(str(inputs))


def test_merge_writes_a_plain_model_with_the_same_rewards(trained, tmp_path):
    main(["merge", "--adapter", str(trained), "--output", str(tmp_path / "merged")])
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tokenizer = builtin_tokenizer()
    adapted = load_adapter(builtin_model(tokenizer), trained).eval()
    batch = tokenizer(["What is 1 + 2 ? 3"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_errors_are_one_line_with_usage_and_failure_exit_codes(tmp_path):
    bad_flag = lora_rm_command("train", "--lr", "abc")
    assert bad_flag.returncode == 2
    assert bad_flag.stderr.splitlines() == [
        "lora-rm: error: argument --lr: invalid float value: 'abc' (see `lora-rm train --help`)"
    ]
    missing = lora_rm_command("eval", "--adapter", str(tmp_path / "nowhere"))
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == [f"lora-rm: error: no adapter_config.json in {tmp_path / 'nowhere'}: "
                                           "not a saved adapter folder"]
    debug = lora_rm_command("eval", "--adapter", str(tmp_path / "nowhere"), LORA_RM_DEBUG="1")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.mark.parametrize("error", [KeyError("chosen"), ImportError("no module named x"), Exception("odd")])
def test_any_failure_is_one_line(monkeypatch, capsys, error):
    def fail(args):
        raise error

    monkeypatch.setattr("lora_rm.cli.run_score", fail)
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--adapter", "x"])
    message = str(exit_info.value.code)
    assert message.startswith(f"lora-rm: error: {type(error).__name__}: ") and "--debug" in message
    assert "\n" not in message
    monkeypatch.setattr("lora_rm.cli.run_score", lambda args: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        main(["score", "--adapter", "x"])


@pytest.mark.parametrize("flags, flag", [
    (["train", "--head-lr", "-1e-4"], "--head-lr"),
    (["train", "--head-lr", "0"], "--head-lr"),
    (["train", "--save-every", "0"], "--save-every"),
    (["train", "--eval-every", "0"], "--eval-every"),
    (["train", "--max-grad-norm", "0"], "--max-grad-norm"),
    (["train", "--lora-r", "0"], "--lora-r"),
    (["train", "--weight-decay", "-1"], "--weight-decay"),
    (["train", "--precision", "fp16", "--device", "cpu"], "--precision"),
    (["train", "--center-rewards-coefficient", "-0.01"], "--center-rewards-coefficient"),
    (["eval", "--adapter", "x", "--batch-size", "0"], "--batch-size"),
    (["eval", "--adapter", "x", "--max-length", "1"], "--max-length"),
    (["score", "--adapter", "x", "--batch-size", "0"], "--batch-size"),
])
def test_out_of_range_settings_are_usage_errors_naming_the_flag(capsys, flags, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lora-rm: error: {flag} must be")


def test_slice_flags_take_a_negative_start_without_equals(trained, capsys):
    main(["eval", "--adapter", str(trained), "--rows", "-5:", "--max-length", "32"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_pairs"] == 5


def test_model_folder_without_config_json_says_so(trained, tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(SystemExit, match=f"^lora-rm: error: --model {tmp_path} is a folder without config.json: "
                                         "not a Hugging Face model folder"):
        main(["eval", "--model", str(tmp_path), "--adapter", str(trained)])


def test_base_weights_load_with_safetensors_only_unless_allowed(tmp_path):
    tokenizer = builtin_tokenizer()
    model = builtin_model(tokenizer)
    model.save_pretrained(tmp_path / "safe")
    tokenizer.save_pretrained(tmp_path / "safe")
    loaded, _ = load_model_and_tokenizer(str(tmp_path / "safe"))
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    pickled = tmp_path / "pickled"
    model.config.save_pretrained(pickled)
    tokenizer.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match="no model.safetensors .* or pass --allow-pickle-weights"):
        load_model_and_tokenizer(str(pickled))
    allowed, _ = load_model_and_tokenizer(str(pickled), allow_pickle_weights=True)
    torch.testing.assert_close(allowed.state_dict(), model.state_dict())


def test_train_prints_the_settings_in_force_and_where_everything_went(trained):
    printed = (trained.parent / "stderr.txt").read_text()
    assert f"lora-rm train: model=builtin dataset=builtin output={trained}\n" in printed
    assert "settings over the defaults: max_rows=80 max_length=32 batch_size=4 lr=0.002" in printed
    assert "max_steps=4" in printed and "progress=False lora.r=4" in printed
    assert f"log: {trained / 'log.jsonl'}" in printed and f"checkpoints: {trained / 'checkpoints'}" in printed
    assert (f"reward report: lora-rm eval --model builtin --adapter {trained} --dataset builtin --split train "
            f"--max-length 32 --length-policy drop --report {trained / 'report'} --log {trained / 'log.jsonl'}"
            ) in printed


def test_help_shows_builtin_overrides_and_importing_the_cli_skips_torch():
    shown = lora_rm_command("train", "--help")
    assert shown.returncode == 0 and "0.002 with --model builtin" in " ".join(shown.stdout.split())
    imported = subprocess.run([sys.executable, "-c", "import sys, lora_rm.cli; print('torch' in sys.modules)"],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert imported.stdout.strip() == "False"


TEXTS = ["What is 1 + 2 ? 3", "What is 1 + 2 ? 4"]


def assert_plain_transformers_scores_as_trained(folder, training_tokenizer, score_args, capsys, tmp_path):
    """AutoTokenizer + AutoModelForSequenceClassification on a merged folder: training's ids and `lora-rm score`'s."""
    plain_tokenizer = AutoTokenizer.from_pretrained(folder)
    plain_model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    inputs = tmp_path / "texts.txt"
    inputs.write_text("\n".join(TEXTS) + "\n")
    capsys.readouterr()
    main(["score", *score_args, "--input", str(inputs)])
    scored = [float(line) for line in capsys.readouterr().out.split()]
    for text, score in zip(TEXTS, scored, strict=True):
        ids = plain_tokenizer(text)["input_ids"]
        assert ids == encode_text(training_tokenizer, None, text)
        with torch.no_grad():
            reward = plain_model(**plain_tokenizer(text, return_tensors="pt")).logits.item()
        assert reward == pytest.approx(score, abs=2e-6)
    reloaded = load_model_and_tokenizer(str(folder))[1]  # lora-rm reading its own saved tokenizer: no second EOS
    assert [encode_text(reloaded, None, t) for t in TEXTS] == [encode_text(training_tokenizer, None, t) for t in TEXTS]


def test_merged_decoder_scores_as_trained_with_plain_transformers(trained, tmp_path, capsys):
    merged = tmp_path / "merged"
    main(["merge", "--adapter", str(trained), "--output", str(merged)])
    assert_plain_transformers_scores_as_trained(merged, builtin_tokenizer(), ["--adapter", str(trained)], capsys,
                                                tmp_path)
    output_tokenizer = AutoTokenizer.from_pretrained(trained)  # the training run's own folder too
    assert output_tokenizer(TEXTS[0])["input_ids"] == encode_text(builtin_tokenizer(), None, TEXTS[0])
    # encode_text with the saved tokenizer adds no second EOS, with or without an EOS already in the text
    for text in (TEXTS[0], TEXTS[0] + "</s>"):
        assert encode_text(output_tokenizer, None, text) == encode_text(builtin_tokenizer(), None, text)


def tiny_bert_folder(folder: Path):
    """A tiny BERT classifier and WordPiece tokenizer built offline, saved as a model folder; its tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "+", "?", "1", "2", "3", "4"]
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=1, pad_token_id=0))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_merged_bert_scores_as_trained_with_plain_transformers(tmp_path, capsys):
    base = tmp_path / "bert"
    tokenizer = tiny_bert_folder(base)
    adapted = add_lora(AutoModelForSequenceClassification.from_pretrained(base),
                       LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    save_adapter(adapted, tmp_path / "adapter")
    merged = tmp_path / "merged"
    main(["merge", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(merged)])
    args = ["--model", str(base), "--adapter", str(tmp_path / "adapter")]
    assert_plain_transformers_scores_as_trained(merged, tokenizer, args, capsys, tmp_path)


def test_ctrl_c_is_one_line_and_exit_code_130(monkeypatch, capsys):
    """The `lora-rm` command (entry_point) says an interrupt in one line instead of a 34-line traceback."""
    monkeypatch.setattr("lora_rm.cli.run_score", lambda args: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as exit_info:
        entry_point(["score", "--adapter", "x"])
    assert exit_info.value.code == 130
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("lora-rm: interrupted (Ctrl-C)") and "--resume" in said[0]


def test_score_input_of_the_wrong_type_is_named_by_its_line(tmp_path):
    """{"text": 5} used to escape as an AttributeError from deep in the tokenizer, naming no line."""
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "a fine text"}\n{"text": 5}\n')
    with pytest.raises(ValueError, match=r"^score input line 2: 'text' must be a string, not int \(5\)"):
        read_score_inputs(str(path))
    path.write_text('{"messages": "hello"}\n')
    with pytest.raises(ValueError, match=r"^score input line 1: messages is not a list of \{role, content\} messages"):
        read_score_inputs(str(path))


def test_eval_log_is_checked_before_the_model_loads(tmp_path):
    missing = tmp_path / "log.jsonl"
    with pytest.raises(SystemExit, match=f"^lora-rm: error: --log {missing}: no such file"):
        main(["eval", "--adapter", str(tmp_path / "no-adapter"), "--log", str(missing)])


def test_merge_refuses_a_file_or_the_adapters_own_folder_as_output(trained, tmp_path):
    """Both used to print "written": onto a file nothing was written; into the adapter folder it mixed the two."""
    existing = tmp_path / "model.bin"
    existing.write_text("keep me")
    with pytest.raises(SystemExit, match=f"^lora-rm: error: merge --output {existing} is a file"):
        main(["merge", "--adapter", str(trained), "--output", str(existing)])
    assert existing.read_text() == "keep me"
    with pytest.raises(SystemExit, match="is the adapter's own folder"):
        main(["merge", "--adapter", str(trained), "--output", str(trained)])


def test_merge_replaces_an_older_merge_whole_and_refuses_other_folders(trained, tmp_path, monkeypatch):
    """A stale chat_template.jinja used to survive a merge into an older merge's folder (it changes how texts are
    encoded); model.safetensors was written 0600; a folder of notes, or the current folder, was merged into."""
    merged = tmp_path / "merged"
    main(["merge", "--adapter", str(trained), "--output", str(merged)])
    (merged / "special_tokens_map.json").write_text("{}")  # as an older merge of another tokenizer left it
    old = os.umask(0o022)
    try:
        main(["merge", "--adapter", str(trained), "--output", str(merged)])
    finally:
        os.umask(old)
    assert not (merged / "special_tokens_map.json").exists()
    assert stat.S_IMODE((merged / "model.safetensors").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(SystemExit, match=f"^lora-rm: error: merge --output {notes} holds files that are not a "
                       r"merged model's \(todo.txt\)"):
        main(["merge", "--adapter", str(trained), "--output", str(notes)])
    assert (notes / "todo.txt").read_text() == "keep me"
    monkeypatch.chdir(notes)
    with pytest.raises(SystemExit, match="is the current folder or one of its parents"):
        main(["merge", "--adapter", str(trained), "--output", ".."])


def adapter_copy_with_nan(trained, folder, picks) -> Path:
    """The trained adapter (no checkpoints) in folder, the first tensor whose key `picks` accepts all NaN."""
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoints"))
    weights = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in weights if picks(k))
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, folder / "adapter_model.safetensors")
    return folder


def test_merge_of_a_nan_head_fails_and_writes_nothing(trained, tmp_path):
    """A NaN in lora_B is refused by LoRALinear.merge; one in the score head used to be written as a model."""
    broken = adapter_copy_with_nan(trained, tmp_path / "broken", lambda key: key.endswith("score.weight"))
    with pytest.raises(SystemExit, match="^lora-rm: error: the merged weights hold NaN or inf"):
        main(["merge", "--adapter", str(broken), "--output", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()


def adapter_copy_with_config(trained, folder, **changes) -> Path:
    """The trained adapter (no checkpoints) in folder, its adapter_config.json changed."""
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_a_malformed_adapter_config_is_named_with_its_field(trained, tmp_path):
    """A JSON list gave an AttributeError naming no file; "r": "16" named the flag --lora-r, never given."""
    listed = adapter_copy_with_config(trained, tmp_path / "listed")
    (listed / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match=f"^lora-rm: error: {listed / 'adapter_config.json'} holds a JSON list"):
        main(["score", "--adapter", str(listed)])
    for field, value in [("r", "16"), ("lora_alpha", "32"), ("lora_dropout", None)]:
        folder = adapter_copy_with_config(trained, tmp_path / field, **{field: value})
        with pytest.raises(SystemExit, match=f"^lora-rm: error: {folder / 'adapter_config.json'}: {field} must be") \
                as caught:
            main(["score", "--adapter", str(folder)])
        assert "--" not in str(caught.value)


def test_an_adapter_of_another_base_is_refused_without_model_and_warned_about_with_one(trained, tmp_path, capsys):
    """Without --model, the 1,811-character list of missing modules used to be all the user saw."""
    other = adapter_copy_with_config(trained, tmp_path / "other", base_model_name_or_path="Qwen/Qwen2.5-0.5B")
    with pytest.raises(SystemExit, match="was trained on 'Qwen/Qwen2.5-0.5B' .* add --model Qwen/Qwen2.5-0.5B$"):
        main(["score", "--adapter", str(other)])
    base = tmp_path / "base"
    builtin_model(builtin_tokenizer()).save_pretrained(base)
    builtin_tokenizer().save_pretrained(base)
    texts = tmp_path / "texts.txt"
    texts.write_text("hello\n")
    with pytest.warns(UserWarning, match=f"trained on 'Qwen/Qwen2.5-0.5B' .*not on '{base}'"):
        main(["score", "--model", str(base), "--adapter", str(other), "--input", str(texts)])
    assert len(capsys.readouterr().out.split()) == 1


def test_score_with_a_nan_adapter_fails_as_eval_does(trained, tmp_path, capsys):
    broken = adapter_copy_with_nan(trained, tmp_path / "broken", lambda key: "lora_B" in key)
    inputs = tmp_path / "texts.txt"
    inputs.write_text("\n".join(TEXTS) + "\n")
    with pytest.raises(SystemExit, match="^lora-rm: error: some rewards are NaN or inf"):
        main(["score", "--adapter", str(broken), "--input", str(inputs)])
    assert capsys.readouterr().out.split() == ["nan", "nan"]


def test_eval_of_the_builtin_task_leaves_out_the_pairs_the_adapter_trained_on(trained, capsys):
    """eval's 'unseen' pairs (--seed 1) repeat the training rows' (seed 42): 1,387 of 2,000 against 1,800 rows."""
    main(["eval", "--adapter", str(trained), "--max-rows", "200", "--max-length", "32"])
    trained_rows = builtin_preference_dataset(2000, seed=42).select(range(72)).to_list()  # 80 rows less 8 held out
    unseen = [row for row in builtin_preference_dataset(2000, seed=1).select(range(200)) if row not in trained_rows]
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["n_pairs"] == len(unseen) < 200
    assert f"eval: {200 - len(unseen)} of the 200 rows are rows the adapter trained on" in captured.err


def test_eval_with_every_pair_dropped_says_why(trained, tmp_path):
    """It used to end in "preference_metrics needs at least one pair"."""
    with pytest.raises(SystemExit, match=r"^lora-rm: error: no eval pairs left: all 10 rows were dropped \(10 longer "
                                         r"than --max-length 4, 0 bad rows skipped\); raise --max-length"):
        main(["eval", "--adapter", str(trained), "--max-rows", "10", "--max-length", "4"])
    rows = tmp_path / "bad.jsonl"
    rows.write_text('{"chosen": "What is 1 + 2 ? 3", "rejected": "What is 1 + 2 ? 3"}\n')
    with pytest.raises(SystemExit, match=r"no eval pairs left: all 1 rows were dropped \(0 longer than --max-length "
                                         r"32, 1 bad rows skipped\)"):
        main(["eval", "--adapter", str(trained), "--dataset", str(rows), "--skip-bad-rows", "--max-length", "32"])


def test_eval_and_score_help_say_what_their_flags_count(capsys):
    helps = {}
    for command in ("eval", "score"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
    assert "training rows" not in helps["eval"]
    assert "--rows STR a slice of the rows to evaluate as text" in helps["eval"]
    assert "--batch-size INT texts per forward" in helps["score"]
    assert "--batch-size INT pairs per forward" in helps["eval"]
