"""A built-in offline task: a tiny tokenizer, a tiny Llama reward model and arithmetic preference pairs.

The pairs ask "What is a + b ?" with a, b in 0..9; the chosen answer is the sum and the rejected answer is the
sum of another random question (never equal to the right one). Both answers are drawn from the same
distribution, so the only way above 50% accuracy is to check the arithmetic.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the heavy imports live inside the functions: `lora-rm --help` reads BUILTIN_TRAIN_DEFAULTS
    from datasets import Dataset
    from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast

# `lora-rm train` with no flags: the README's main job, about 10 s on 2 cores. These override TrainConfig's
# defaults (which suit a real model) only when --model is "builtin"; flags given still win.
BUILTIN_TRAIN_DEFAULTS = dict(lr=2e-3, epochs=3.0, batch_size=16, max_length=32, log_every=20, eval_every=50)
BUILTIN_PAIRS = 2000  # rows of the built-in preference dataset
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = ["What", "is", "+", "?", "user", "assistant", ":"] + [str(n) for n in range(19)]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}{{ eos_token }}"


def builtin_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline, Llama-like: <s> prepended, </s> as EOS, a separate pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    bos = [("<s>", vocab["<s>"])]
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=bos)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def builtin_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForSequenceClassification:
    """A random-init 2-layer Llama with a one-output score head, small enough to train on a laptop CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        initializer_range=0.1,  # at the default 0.02 a frozen random base barely mixes tokens: LoRA stalls
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # the same base every time, without resetting the caller's RNG
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(config)


def builtin_preference_dataset(n_pairs: int, seed: int = 0) -> Dataset:
    """Explicit-prompt pairs (prompt, chosen, rejected) whose chosen answer is verifiably the right sum."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n_pairs):
        a, b = rng.randrange(10), rng.randrange(10)
        wrong = a + b
        while wrong == a + b:
            wrong = rng.randrange(10) + rng.randrange(10)
        rows["prompt"].append(f"What is {a} + {b} ?")
        rows["chosen"].append(f" {a + b}")
        rows["rejected"].append(f" {wrong}")
    return Dataset.from_dict(rows)


def builtin_ranking_dataset(n_rows: int, k: int = 4, seed: int = 0) -> Dataset:
    """K-way rows (prompt, responses, scores): the right sum and k - 1 distinct wrong ones, in random order, each
    scored by minus its distance from the right sum (so the right one is best)."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows: dict[str, list] = {"prompt": [], "responses": [], "scores": []}
    for _ in range(n_rows):
        a, b = rng.randrange(10), rng.randrange(10)
        answers = [a + b]
        while len(answers) < k:
            wrong = rng.randrange(10) + rng.randrange(10)  # as the pairs' rejected: the distribution of a sum
            if wrong not in answers:
                answers.append(wrong)
        rng.shuffle(answers)
        rows["prompt"].append(f"What is {a} + {b} ?")
        rows["responses"].append([f" {answer}" for answer in answers])
        rows["scores"].append([-abs(answer - (a + b)) for answer in answers])
    return Dataset.from_dict(rows)
