"""Best-of-N: rank N candidate answers to a prompt by reward, the job a reward model does in rejection sampling.

    python examples/best_of_n.py                      # train the built-in arithmetic reward model, rank 20 prompts
    python examples/best_of_n.py --adapter runs/builtin                         # rank with an adapter you trained
    python examples/best_of_n.py --adapter runs/builtin --prompt "What is 7 + 8 ?"
    python examples/best_of_n.py --adapter DIR --model MODEL --prompt TEXT --candidates answers.txt

Each candidate is appended to the prompt as is, the way a (prompt, completion) preference pair joins them in
training, so start each one with the separator the model was trained with (a space for the built-in task). The
candidates file holds one per line, taken verbatim (leading spaces kept). Without --candidates the candidates are
the built-in task's answers " 0" .. " 18".
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from lora_rm import load_adapter
from lora_rm.builtin import BUILTIN_TRAIN_DEFAULTS
from lora_rm.config import TrainConfig
from lora_rm.evaluate import score_texts
from lora_rm.model_io import load_model_and_tokenizer
from lora_rm.train import train

ANSWERS = [f" {n}" for n in range(19)]  # every sum of two digits: the right one is 1 of 19
FAST = dict(max_steps=3, max_rows=100)  # 3 optimizer steps on 90 pairs, 10 held out


def rank(model, tokenizer, prompt: str, candidates: list[str], max_length: int | None) -> list[tuple[float, str]]:
    """(reward, candidate) pairs, best first."""
    rewards = score_texts(model, tokenizer, [prompt + candidate for candidate in candidates], max_length)
    return sorted(zip(rewards, candidates, strict=True), reverse=True)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Rank candidates for each prompt; returns the top-1 accuracy on the arithmetic prompts."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", help="a trained adapter folder; default: train the built-in task first")
    parser.add_argument("--model", default="builtin", help="the adapter's base model: hub id, folder or 'builtin'")
    parser.add_argument("--prompt", help="rank the candidates for this one prompt")
    parser.add_argument("--candidates", help="file of candidates, one a line; default ' 0' .. ' 18'")
    parser.add_argument("--n-prompts", type=int, default=20, help="arithmetic prompts to rank, at most 100")
    parser.add_argument("--top", type=int, default=3, help="candidates to print per prompt")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per text; a longer text is an error")
    parser.add_argument("--output", default="runs/best_of_n", help="where the built-in model is trained")
    parser.add_argument("--fast", action="store_true", help="a few training steps only, for the tests")
    args = parser.parse_args(argv)
    if not 1 <= args.n_prompts <= 100:
        parser.error("--n-prompts must be in 1..100: there are 100 questions a + b with digits a, b")

    adapter = args.adapter
    if adapter is None:
        if args.model != "builtin":
            parser.error("--model needs --adapter: only the built-in model is trained here")
        settings = {**BUILTIN_TRAIN_DEFAULTS, **(FAST if args.fast else {})}
        train(TrainConfig(output=args.output, overwrite=True, progress=False, **settings))
        adapter = args.output
    model, tokenizer = load_model_and_tokenizer(args.model)
    load_adapter(model, adapter).eval()
    candidates = ANSWERS
    if args.candidates:
        candidates = [line for line in Path(args.candidates).read_text().splitlines() if line.strip()]

    if args.prompt is not None:
        for reward, candidate in rank(model, tokenizer, args.prompt, candidates, args.max_length):
            print(f"{reward:+.4f}  {candidate!r}")
        return {}

    hits = 0
    for a, b in (divmod(q, 10) for q in random.Random(0).sample(range(100), args.n_prompts)):  # distinct questions
        ranked = rank(model, tokenizer, f"What is {a} + {b} ?", candidates, args.max_length)
        best = ranked[0][1]
        hits += best.strip() == str(a + b)
        top = ", ".join(f"{candidate.strip()} ({reward:+.3f})" for reward, candidate in ranked[: args.top])
        print(f"What is {a} + {b} ?  top-{args.top}: {top}  {'right' if best.strip() == str(a + b) else 'wrong'}")
    accuracy = hits / args.n_prompts
    print(f"top-1 accuracy: {accuracy:.3f} over {args.n_prompts} prompts (chance: {1 / len(candidates):.3f})")
    return {"top1_accuracy": accuracy}


if __name__ == "__main__":
    main()
