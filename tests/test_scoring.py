"""Scoring at scale and the hand-off to RL trainers: `lora-rm score --output` streamed, resumed and under torchrun,
`eval --predictions`, stock models without an adapter, and a merged folder scored by TRL's GRPOTrainer."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import stock_model_folder, torchrun_process, write_jsonl
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lora_rm.scoring as scoring
from lora_rm import LoraConfig, add_lora, load_adapter, save_adapter
from lora_rm.builtin import builtin_model, builtin_tokenizer
from lora_rm.cli import main
from lora_rm.encode import encode_text
from lora_rm.evaluate import score_texts

ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "user", "content": "What is 2 + 2 ?"}, {"role": "assistant", "content": "4"}]
# Every row shape, a blank line (numbered, no output) and rows of many lengths, so windows sort and split them.
ROWS = [
    '{"text": "What is 3 + 4 ? 7"}',
    '{"id": "a", "prompt": "What is 3 + 4 ?", "response": " 9"}',
    "",
    json.dumps({"messages": CHAT}),
    "What is 1 + 1 ? 2 2 2 2 2 2 2",
    '{"id": 7, "text": "What is 5 + 5 ? 10"}',
    "42",
    json.dumps({"id": "chat", "prompt": CHAT[:1], "response": CHAT[1:]}),
    *[f"What is {n % 10} + 3 ? {' '.join(['1'] * (1 + n % 9))}" for n in range(12)],
]
EXPECTED_IDS = [1, "a", 4, 5, 7, 7, "chat", *range(9, 21)]
ITEMS = ["What is 3 + 4 ? 7", ("What is 3 + 4 ?", " 9"), CHAT, "What is 1 + 1 ? 2 2 2 2 2 2 2",
         "What is 5 + 5 ? 10", "42", (CHAT[:1], CHAT[1:]),
         *[f"What is {n % 10} + 3 ? {' '.join(['1'] * (1 + n % 9))}" for n in range(12)]]
FLAGS = ["--window", "5", "--batch-size", "3", "--no-progress"]  # 19 rows: 3 whole windows and a short one


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A built-in model's adapter that changes its rewards (random A and B), saved as `lora-rm train` saves one."""
    folder = tmp_path_factory.mktemp("adapter")
    tokenizer = builtin_tokenizer()
    model = add_lora(builtin_model(tokenizer), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    save_adapter(model, folder)
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "in.jsonl"
    path.write_text("\n".join(ROWS) + "\n")
    return path


@pytest.fixture(scope="module")
def full_run(adapter, inputs, tmp_path_factory):
    """The uninterrupted run's bytes."""
    output = tmp_path_factory.mktemp("full") / "out.jsonl"
    main(["score", "--adapter", str(adapter), "--input", str(inputs), "--output", str(output), *FLAGS])
    return output.read_bytes()


def read_scores(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


def test_streamed_scores_are_the_apis_in_input_order_with_ids(adapter, full_run):
    scores = read_scores(full_run)
    assert [score["id"] for score in scores] == EXPECTED_IDS
    tokenizer = builtin_tokenizer()
    model = load_adapter(builtin_model(tokenizer), adapter).eval()
    one_by_one = [score_texts(model, tokenizer, [item], batch_size=1)[0] for item in ITEMS]
    assert [score["reward"] for score in scores] == pytest.approx(one_by_one, abs=1e-5)
    base = builtin_model(tokenizer).eval()
    assert max(abs(a - b) for a, b in zip(score_texts(base, tokenizer, ITEMS), one_by_one, strict=True)) > 1e-2


@pytest.mark.parametrize("cut", ["empty", "torn_first_line", "inside_a_window", "window_boundary", "torn_last_line",
                                 "complete"])
def test_a_rerun_after_any_cut_scores_only_what_is_missing_and_writes_the_same_bytes(
        adapter, inputs, full_run, tmp_path, monkeypatch, cut):
    lines = full_run.splitlines(keepends=True)
    ends = [sum(len(line) for line in lines[: n + 1]) for n in range(len(lines))]
    offset = {"empty": 0, "torn_first_line": 7, "inside_a_window": ends[6] + 3, "window_boundary": ends[9],
              "torn_last_line": len(full_run) - 2, "complete": len(full_run)}[cut]
    rows_expected = {"empty": 19, "torn_first_line": 19, "inside_a_window": 14, "window_boundary": 9,
                     "torn_last_line": 4, "complete": 0}[cut]  # whole windows of 5 are kept; a cut one is rescored
    output = tmp_path / "out.jsonl"
    output.write_bytes(full_run[:offset])
    real, scored = scoring.window_rewards, []
    monkeypatch.setattr(scoring, "window_rewards", lambda model, tokenizer, rows, *args: (
        scored.extend(rows), real(model, tokenizer, rows, *args))[1])
    main(["score", "--adapter", str(adapter), "--input", str(inputs), "--output", str(output), *FLAGS])
    assert output.read_bytes() == full_run
    assert len(scored) == rows_expected


KILL_ON_THE_THIRD_WINDOW = """
import os, signal, sys
import lora_rm.scoring as scoring
from lora_rm.cli import main
calls = []
def append_then_die(handle, window, rewards):
    calls.append(1)
    if len(calls) == 3:  # half of the third window's bytes reach the file, then the process is killed
        data = "".join(scoring.score_line(row[1], reward) for row, reward in zip(window, rewards)).encode()
        handle.write(data[: len(data) // 2]); handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real(handle, window, rewards)
real, scoring.append_window = scoring.append_window, append_then_die
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_killed_run_rerun_with_the_same_command_writes_the_same_bytes(adapter, inputs, full_run, tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    command = ["score", "--adapter", str(adapter), "--input", str(inputs), "--output", str(output), *FLAGS]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILL_ON_THE_THIRD_WINDOW, *command], capture_output=True,
                            text=True, env=environment, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not output.read_bytes().endswith(b"\n")  # a torn line is there to cut
    main(command)
    assert "(10 already there)" in capsys.readouterr().err
    assert output.read_bytes() == full_run


def test_an_output_from_other_input_or_another_file_is_refused(adapter, inputs, full_run, tmp_path):
    output = tmp_path / "out.jsonl"
    command = ["score", "--adapter", str(adapter), "--input", str(inputs), "--output", str(output), *FLAGS]
    output.write_bytes(full_run.replace(b'"id": "a"', b'"id": "b"'))
    with pytest.raises(SystemExit, match=r"line 2 has id 'b' where input line 2 has id 'a': it was written from "):
        main(command)
    output.write_bytes(full_run + full_run[:40])  # complete lines past the input's end: not a torn tail
    with pytest.raises(SystemExit, match="has more lines than the input has rows"):
        main(command)
    output.write_text("my notes\nmore notes\n")
    with pytest.raises(SystemExit, match="line 1 is not a score line .* delete it or choose another --output"):
        main(command)
    assert output.read_text() == "my notes\nmore notes\n"  # left as it was
    output.write_text("my notes")  # one line, no newline: it used to be taken for a torn score line and emptied
    with pytest.raises(SystemExit, match="line 1 is not a score line"):
        main(command)
    assert output.read_text() == "my notes"


def test_lines_end_at_newline_only_in_both_score_modes(adapter, tmp_path, capsys):
    """A raw U+2028 inside a JSON string split one row in two (str.splitlines); a lone \\r split a plain line in
    the streamed mode, whose ids then disagreed with the line count."""
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"text": "What is 1 + 1 ?\u2028 2"}, ensure_ascii=False) + "\nWhat is 2 + 2 ?\r 4\n",
                    newline="")
    main(["score", "--adapter", str(adapter), "--input", str(rows)])
    assert len(capsys.readouterr().out.split()) == 2
    output = tmp_path / "out.jsonl"
    main(["score", "--adapter", str(adapter), "--input", str(rows), "--output", str(output), "--no-progress"])
    assert [record["id"] for record in read_scores(output.read_bytes())] == [1, 2]


@pytest.mark.slow
def test_torchrun_splits_the_rows_and_writes_the_same_file(adapter, inputs, full_run, tmp_path):
    output = tmp_path / "out.jsonl"
    kept = b"".join(full_run.splitlines(keepends=True)[:10])  # two whole windows, then a torn third one
    output.write_bytes(full_run[: len(kept) + 12])
    done = torchrun_process("-m", "lora_rm", "score", "--adapter", str(adapter), "--input", str(inputs), "--output",
                            str(output), *FLAGS)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("(10 already there)") == 1  # resumed after the two whole windows; rank 0 says so
    ours, one_process = read_scores(output.read_bytes()), read_scores(full_run)
    assert [score["id"] for score in ours] == EXPECTED_IDS
    assert [score["reward"] for score in ours] == pytest.approx([s["reward"] for s in one_process], abs=1e-5)
    assert output.read_bytes().startswith(kept)


def test_a_stock_model_is_scored_and_evaluated_without_an_adapter(inputs, tmp_path, capsys):
    with pytest.raises(SystemExit, match="score without --adapter scores --model as it is: give a one-label"):
        main(["score", "--input", str(inputs)])  # the built-in model, untrained
    stock = tmp_path / "stock"
    stock_model_folder(stock)
    output = tmp_path / "out.jsonl"
    main(["score", "--model", str(stock), "--input", str(inputs), "--output", str(output), *FLAGS])
    model = AutoModelForSequenceClassification.from_pretrained(stock).eval()
    tokenizer = AutoTokenizer.from_pretrained(stock)
    expected = []
    for item in ITEMS:  # plain transformers on training's ids
        ids = encode_text(tokenizer, *(item if isinstance(item, tuple) else (None, item)))
        with torch.no_grad():
            expected.append(model(input_ids=torch.tensor([ids])).logits.item())
    assert [score["reward"] for score in read_scores(output.read_bytes())] == pytest.approx(expected, abs=1e-5)
    predictions = tmp_path / "predictions.jsonl"
    main(["eval", "--model", str(stock), "--max-rows", "24", "--max-length", "32", "--predictions", str(predictions)])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pairs = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [pair["id"] for pair in pairs] == list(range(24)) and metrics["n_pairs"] == 24
    wins = sum(pair["chosen_reward"] > pair["rejected_reward"] for pair in pairs)
    assert metrics["accuracy"] == pytest.approx(wins / 24)


def test_a_base_model_without_a_reward_head_is_refused_without_an_adapter(tmp_path):
    """A causal LM scored without --adapter got a randomly drawn head, with only transformers' log saying so."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = builtin_tokenizer()
    base = tmp_path / "base"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    texts = tmp_path / "texts.txt"
    texts.write_text("hello\n")
    with pytest.raises(SystemExit, match="is saved as LlamaForCausalLM, not as a \\*ForSequenceClassification"):
        main(["score", "--model", str(base), "--input", str(texts)])


def test_eval_predictions_name_pairs_by_their_id_column_and_skip_dropped_pairs(adapter, tmp_path, capsys):
    rows = [{"id": f"q{n}", "chosen": f"What is {n} + 1 ? {n + 1}", "rejected": f"What is {n} + 1 ? {n}"}
            for n in range(6)]
    rows[2]["chosen"] += " 1" * 40  # over --max-length 32: dropped, so not predicted
    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, rows)
    predictions = tmp_path / "predictions.jsonl"
    main(["eval", "--adapter", str(adapter), "--dataset", str(data), "--max-length", "32", "--predictions",
          str(predictions)])
    pairs = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [pair["id"] for pair in pairs] == ["q0", "q1", "q3", "q4", "q5"]
    tokenizer = builtin_tokenizer()
    model = load_adapter(builtin_model(tokenizer), adapter).eval()
    kept = [rows[n] for n in (0, 1, 3, 4, 5)]
    assert [p["chosen_reward"] for p in pairs] == pytest.approx(
        score_texts(model, tokenizer, [row["chosen"] for row in kept]), abs=1e-5)
    assert [p["rejected_reward"] for p in pairs] == pytest.approx(
        score_texts(model, tokenizer, [row["rejected"] for row in kept]), abs=1e-5)
    with pytest.raises(SystemExit, match="--predictions .* its folder does not exist"):
        main(["eval", "--adapter", str(adapter), "--predictions", str(tmp_path / "no" / "p.jsonl")])


@pytest.mark.slow
def test_grpo_scores_a_merged_folder_as_lora_rm_score_does(adapter, tmp_path):
    """TRL's GRPOTrainer itself (the test-only oracle) loads the merged folder from its path, as
    `reward_funcs="path"` does (AutoModelForSequenceClassification.from_pretrained(path, num_labels=1), the
    tokenizer from the same path, pad id set on the config), and scores completions in its own _calculate_rewards
    (chat template for conversational prompts, then tokenizer(..., padding_side="right", add_special_tokens=False)
    and logits[:, 0]). Conversational prompts give `lora-rm score`'s rewards; plain-text prompts do not, because
    GRPO tokenizes p + c without special tokens, so neither the BOS nor the EOS that training added is there."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    merged = tmp_path / "merged"
    main(["merge", "--adapter", str(adapter), "--output", str(merged)])
    tokenizer = builtin_tokenizer()
    policy = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tokenizer)))
    config = GRPOConfig(output_dir=str(tmp_path / "grpo"), use_cpu=True, report_to="none", bf16=False,
                        per_device_train_batch_size=2, num_generations=2, max_completion_length=4)
    trainer = GRPOTrainer(model=policy, reward_funcs=str(merged), args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": "What is 1 + 2 ?"}] * 4))
    prompts = [[{"role": "user", "content": f"What is {n} + 2 ?"}] for n in range(4)]
    completions = [[{"role": "assistant", "content": answer}] for answer in ("3", "4 4 4 4", "5", "1")]

    def grpo_rewards(prompts, completions):
        inputs = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]
        return trainer._calculate_rewards(inputs, prompts, completions, [[0]] * len(prompts))[:, 0].tolist()

    rows = tmp_path / "rows.jsonl"
    write_jsonl(rows, [{"prompt": p, "response": c} for p, c in zip(prompts, completions, strict=True)])
    output = tmp_path / "out.jsonl"
    main(["score", "--adapter", str(adapter), "--input", str(rows), "--output", str(output), "--no-progress"])
    ours = [score["reward"] for score in read_scores(output.read_bytes())]
    assert grpo_rewards(prompts, completions) == pytest.approx(ours, abs=1e-5)
    texts = [f"What is {n} + 2 ?" for n in range(4)], [" 3", " 4 4 4 4", " 5", " 1"]
    theirs = grpo_rewards(*texts)
    lora_rm = score_texts(load_adapter(builtin_model(tokenizer), adapter).eval(), tokenizer,
                          [p + c for p, c in zip(*texts, strict=True)])
    assert max(abs(a - b) for a, b in zip(theirs, lora_rm, strict=True)) > 1e-3  # the known gap, see the README


def test_nan_rewards_are_written_as_null_and_fail_the_run_also_when_resumed(adapter, inputs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    weights = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_B" in k)
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, broken / "adapter_model.safetensors")
    output = tmp_path / "out.jsonl"
    command = ["score", "--adapter", str(broken), "--input", str(inputs), "--output", str(output), *FLAGS]
    for _ in range(2):  # the rerun scores nothing and still fails
        with pytest.raises(SystemExit, match="^lora-rm: error: 19 rewards are NaN or inf"):
            main(command)
    assert {score["reward"] for score in read_scores(output.read_bytes())} == {None}


def test_a_text_longer_than_the_models_position_table_is_refused_by_name(tmp_path):
    """GPT-2's learned positions stop at n_positions: a longer text used to fail the batch with an IndexError in
    `score` (with and without --output); it is refused as serve refuses it, naming the position table."""
    from transformers import GPT2Config

    tokenizer = builtin_tokenizer()
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=len(tokenizer), num_labels=1,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=None)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    long_text = "What is 1 + 2 ?" * 10
    assert len(encode_text(tokenizer, None, long_text)) > 16
    named = r"the model's max_position_embeddings \(16; --max-length is None\)"
    with pytest.raises(ValueError, match=rf"texts \[1\] are longer than {named} tokens"):
        score_texts(model, tokenizer, ["What is 1 + 2 ?", long_text], packing="none")
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": "What is 1 + 2 ?"}, {"text": long_text}])
    with pytest.raises(ValueError, match=rf"score input line 2 \(id 2\) has \d+ tokens, over {named}"):
        scoring.score_file(model, tokenizer, rows, tmp_path / "rewards.jsonl", packing="none", progress=False)
