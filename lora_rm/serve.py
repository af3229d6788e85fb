"""`lora-rm serve`: a reward model behind HTTP (FastAPI + uvicorn, the `lora-rm[serve]` extra), batched across requests.

    POST /get_reward   OpenRLHF's shape: {"query": [text, ...]} -> {"rewards": [...], "scores": [...]}
    POST /v1/rewards   `lora-rm score`'s rows: {"rows": [text | {"text"} | {"messages"} | {"prompt", "response"},
                       each with an optional "id"]} -> {"results": [{"id", "reward"}, ...]}
    GET  /health       200 once the model is loaded (never behind the API key)
    GET  /metrics      Prometheus text: requests, texts, batch sizes, latency

A text's reward is `lora-rm score`'s: each text encoded once, as evaluate.score_texts encodes it, and its token ids
scored by the same score_token_ids, on batches that one worker thread gathers from concurrent requests (sorted by
length, within --max-batch-size texts and --max-batch-tokens padded tokens). Padded rows are right-padded and
packed rows keep each text's attention to itself, so a reward does not depend on its batch companions (fp32:
within 1e-5). The event loop only parses, awaits and answers; tokenizing runs in a thread and the model in the
worker.

Bad input is answered {"error": "<one line>"} with 400 (malformed JSON, a missing field, a non-text item, an empty
list, a text over --max-length tokens: refused as score refuses it, never truncated) or 413 (too many texts, too
large a body); 401 without the API key. No endpoint reads a file or model the client names. SIGTERM or SIGINT stops
accepting, answers the requests in flight, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import ipaddress
import json
import math
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import scoring
from .config import ServeConfig
from .evaluate import encode_item, longest_text, score_token_ids
from .packing import resolve_packing

EXTRA_HINT = "pip install 'lora-rm[serve]'"
OPEN_PATHS = ("/health",)  # answered without the API key: a load balancer probes it
PATHS = ("/get_reward", "/v1/rewards", "/health", "/metrics")  # any other is counted as "other" (bounded labels)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestError(Exception):
    """Bad input: its HTTP status and the one line the client reads."""

    def __init__(self, status: int, message: str):
        super().__init__(" ".join(message.split()))
        self.status = status


# ---- requests: JSON in, the items score_texts takes out -----------------------------------------------------------

def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 naming what is wrong."""
    try:
        parsed = json.loads(body)
    except ValueError as error:  # JSONDecodeError and bad UTF-8 both
        raise RequestError(400, f"the body is not valid JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise RequestError(400, f"the body must be a JSON object, not {type(parsed).__name__}")
    return parsed


def request_list(body: dict[str, Any], key: str, limit: int) -> list:
    """body[key] as a non-empty list of at most `limit` entries (400 or 413 otherwise)."""
    if key not in body:
        raise RequestError(400, f"missing field '{key}'")
    values = body[key]
    if not isinstance(values, list):
        raise RequestError(400, f"'{key}' must be a list, not {type(values).__name__}")
    if not values:
        raise RequestError(400, f"'{key}' is empty")
    if len(values) > limit:
        raise RequestError(413, f"'{key}' has {len(values)} entries, over --max-request-texts {limit}")
    return values


def strip_padding(text: str, pad_token: str | None) -> str:
    """The text without pad tokens repeated at either end: OpenRLHF sends decoded, left-padded sequences and its own
    serve_rm strips them the same way."""
    if not pad_token:
        return text
    while text.startswith(pad_token):
        text = text[len(pad_token):]
    while text.endswith(pad_token):
        text = text[: -len(pad_token)]
    return text


def query_items(body: dict[str, Any], limit: int, pad_token: str | None) -> list[str]:
    """/get_reward's texts; any other field ("prompts", "labels": OpenRLHF sends them) is ignored."""
    queries = request_list(body, "query", limit)
    for index, query in enumerate(queries):
        if not isinstance(query, str):
            raise RequestError(400, f"query[{index}] must be a string, not {type(query).__name__}")
    return [strip_padding(query, pad_token) for query in queries]


def row_item(row: Any, where: str) -> Any:
    """One row as score_texts' item, checked as `lora-rm score` checks an input line (scoring.row_item)."""
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise RequestError(400, f"{where} must be a string or an object, not {type(row).__name__}")
    try:
        return scoring.row_item(row, where)
    except ValueError as error:
        raise RequestError(400, str(error)) from None


def row_items(body: dict[str, Any], limit: int) -> tuple[list, list]:
    """/v1/rewards' items and ids (a row's "id", else its index in "rows")."""
    rows = request_list(body, "rows", limit)
    items = [row_item(row, f"rows[{index}]") for index, row in enumerate(rows)]
    ids = [row["id"] if isinstance(row, dict) and "id" in row else index for index, row in enumerate(rows)]
    return items, ids


def encode_items(tokenizer, items: list, limit: int | None, limit_name: str, where: str) -> list[list[int]]:
    """Each item's token ids as score encodes it (once: the worker scores these ids); a text over the limit is
    refused as `lora-rm score` refuses it."""
    sides = []
    for index, item in enumerate(items):
        try:
            sides.append(encode_item(tokenizer, item))
        except Exception as error:  # a chat the template cannot render, say
            raise RequestError(400, f"{where}[{index}] cannot be encoded: {type(error).__name__}: {error}") from None
    too_long = [index for index, ids in enumerate(sides) if limit and len(ids) > limit]
    if too_long:
        first = too_long[0]
        raise RequestError(400, f"{len(too_long)} text(s) over {limit_name} tokens, the first {where}[{first}] with "
                           f"{len(sides[first])}: refused, as `lora-rm score` refuses them (no truncation)")
    return sides


# ---- batching: one worker thread runs the model ------------------------------------------------------------------

@dataclass
class Job:
    """One request's texts as token ids, waiting for their rewards; only the worker thread touches `rewards` and
    `missing`."""

    sides: list[list[int]]
    arrived: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    rewards: list[float] = field(init=False)  # NaN until the worker fills each in
    missing: int = field(init=False)

    def __post_init__(self) -> None:
        self.rewards, self.missing = [math.nan] * len(self.sides), len(self.sides)


@dataclass
class Text:
    """One text of a job on its way through a batch."""

    job: Job
    index: int  # in job.sides
    length: int  # tokens


def plan_batches(texts: list[Text], max_size: int, max_tokens: int) -> list[list[Text]]:
    """Texts sorted by length, cut into batches of at most max_size texts and max_tokens padded tokens (texts x the
    longest); a text over max_tokens on its own makes a batch."""
    batches: list[list[Text]] = []
    current: list[Text] = []
    for text in sorted(texts, key=lambda text: text.length):
        if current and (len(current) == max_size or (len(current) + 1) * text.length > max_tokens):
            batches.append(current)
            current = []
        current.append(text)
    return batches + [current] if current else batches


class Batcher:
    """Gathers the texts of concurrent requests for up to `wait_s` (or max_size texts), runs them in batches on one
    worker thread, and resolves each request's future with exactly its own rewards, in its own order."""

    def __init__(self, score: Callable[[list[list[int]]], list[float]], max_size: int, max_tokens: int, wait_s: float,
                 metrics: Metrics):
        self.score, self.max_size, self.max_tokens, self.wait_s = score, max_size, max_tokens, wait_s
        self.metrics = metrics
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.stopping = False
        self.arriving = 0  # requests being parsed and tokenized, not yet submitted (counted on the event loop)
        self.thread = threading.Thread(target=self.run, name="lora-rm-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, sides: list[list[int]]) -> concurrent.futures.Future:
        job = Job(sides)
        self.jobs.put(job)
        return job.future

    def stop(self) -> None:
        """Finish what was submitted, then end the worker."""
        self.jobs.put(None)
        self.thread.join()

    def run(self) -> None:
        while not self.stopping:
            jobs = self.gather()
            texts = [Text(job, index, len(ids)) for job in jobs for index, ids in enumerate(job.sides)]
            for batch in plan_batches(texts, self.max_size, self.max_tokens):
                self.run_batch(batch)

    def gather(self) -> list[Job]:
        """The first waiting job, then others until its wait is over, none is on its way, or max_size texts are in
        hand."""
        first = self.jobs.get()
        if first is None:
            self.stopping = True
            return []
        jobs, waiting = [first], len(first.sides)
        while waiting < self.max_size:
            remaining = first.arrived + self.wait_s - time.monotonic()
            # Wait only while another request is being parsed or tokenized: a lone client pays no wait. Past the
            # wait, or with nothing on its way, still take what is already queued.
            try:
                wait = remaining > 0 and self.arriving > 0
                job = self.jobs.get(timeout=remaining) if wait else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.stopping = True
                break
            jobs.append(job)
            waiting += len(job.sides)
        return jobs

    def run_batch(self, batch: list[Text]) -> None:
        try:
            rewards = self.score([text.job.sides[text.index] for text in batch])
        except Exception as error:  # e.g. out of memory: those requests fail (500), the server goes on
            for text in batch:
                if not text.job.future.done():
                    text.job.future.set_exception(error)
            return
        self.metrics.observe_batch(len(batch), len(batch) * max(text.length for text in batch))
        for text, reward in zip(batch, rewards, strict=True):
            text.job.rewards[text.index] = reward
            text.job.missing -= 1
            if text.job.missing == 0 and not text.job.future.done():
                text.job.future.set_result(text.job.rewards)


# ---- metrics: Prometheus' text format, written by hand ------------------------------------------------------------

class Histogram:
    """Cumulative buckets, a sum and a count: a Prometheus histogram."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for number, bound in enumerate(self.buckets):
            self.counts[number] += value <= bound
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        bounds = [f"{bound:g}" for bound in self.buckets] + ["+Inf"]
        counts = [*self.counts, self.count]
        return ([f'{name}_bucket{{le="{bound}"}} {count}' for bound, count in zip(bounds, counts, strict=True)]
                + [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"])


class Metrics:
    """What /metrics reports; updated from the event loop and the worker thread, hence the lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.texts = self.batches = self.padded_tokens = self.in_flight = 0
        self.batch_size = Histogram(BATCH_SIZE_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)

    def observe_request(self, path: str, status: int) -> None:
        with self.lock:
            self.requests[path, status] = self.requests.get((path, status), 0) + 1

    def observe_rewards(self, n_texts: int, seconds: float) -> None:
        with self.lock:
            self.texts += n_texts
            self.latency.observe(seconds)

    def observe_batch(self, n_texts: int, padded_tokens: int) -> None:
        with self.lock:
            self.batches += 1
            self.padded_tokens += padded_tokens
            self.batch_size.observe(n_texts)

    def render(self) -> str:
        def family(name: str, kind: str, help_text: str, lines: list[str]) -> list[str]:
            return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines]

        with self.lock:
            requests = [f'lora_rm_requests_total{{path="{path}",status="{status}"}} {count}'
                        for (path, status), count in sorted(self.requests.items())]
            lines = [
                *family("lora_rm_requests_total", "counter", "HTTP requests answered, by path and status.", requests),
                *family("lora_rm_texts_total", "counter", "Texts scored.", [f"lora_rm_texts_total {self.texts}"]),
                *family("lora_rm_batches_total", "counter", "Model forwards run.",
                        [f"lora_rm_batches_total {self.batches}"]),
                *family("lora_rm_batch_tokens_total", "counter", "Tokens of those forwards, counted padded (texts x "
                        "longest).", [f"lora_rm_batch_tokens_total {self.padded_tokens}"]),
                *family("lora_rm_reward_requests_in_flight", "gauge", "Reward requests being answered.",
                        [f"lora_rm_reward_requests_in_flight {self.in_flight}"]),
                *family("lora_rm_batch_size", "histogram", "Texts per forward.",
                        self.batch_size.lines("lora_rm_batch_size")),
                *family("lora_rm_request_latency_seconds", "histogram", "Reward requests answered with 200, from "
                        "the first byte read to the answer.", self.latency.lines("lora_rm_request_latency_seconds")),
            ]
        return "\n".join(lines) + "\n"


# ---- normalization and security ----------------------------------------------------------------------------------

def read_reward_stats(adapter: str | Path | None) -> dict[str, float]:
    """{"mean", "std"} of the run's eval rewards, from ADAPTER/reward_stats.json (lora-rm train writes it)."""
    if adapter is None:
        raise ValueError("--normalize reads reward_stats.json from the run folder given as --adapter; give --adapter")
    path = Path(adapter) / "reward_stats.json"
    if not path.is_file():
        raise ValueError(f"--normalize: {path} not found (lora-rm train writes it beside the adapter when it "
                         "evaluates)")
    stats = json.loads(path.read_text())
    mean, std = stats.get("mean"), stats.get("std")
    if not all(isinstance(value, int | float) and math.isfinite(value) for value in (mean, std)) or std <= 0:
        raise ValueError(f"--normalize: {path} needs a finite 'mean' and a positive 'std', got {stats}")
    return {"mean": float(mean), "std": float(std)}


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach the address (a hostname other than localhost might resolve anywhere)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_warning(host: str, api_key: str | None) -> str | None:
    """The warning to print when the server is reachable from other machines with no key, else None."""
    if api_key or is_loopback(host):
        return None
    return (f"lora-rm serve: warning: binding {host}, reachable from other machines, without an API key: anyone who "
            "reaches this port can use the model; set LORA_RM_API_KEY (or --api-key)")


def authorized(header: str | None, api_key: str | None) -> bool:
    """Whether an Authorization header carries the key (compared in constant time)."""
    if api_key is None:
        return True
    return hmac.compare_digest((header or "").encode(), f"Bearer {api_key}".encode())


# ---- the service and its routes ------------------------------------------------------------------------------------

class RewardService:
    """The model behind the endpoints: requests in, rewards out through the batcher."""

    def __init__(self, model, tokenizer, config: ServeConfig, max_length: int | None, packing: str,
                 normalization: dict[str, float] | None):
        self.tokenizer, self.config, self.normalization = tokenizer, config, normalization
        self.limit, self.limit_name = longest_text(model, max_length)
        self.metrics = Metrics()

        mode = resolve_packing(packing, model, lambda message: print(message, file=sys.stderr))

        def score(sides: list[list[int]]) -> list[float]:
            return score_token_ids(model, tokenizer.pad_token_id, sides, len(sides), mode)

        self.batcher = Batcher(score, config.max_batch_size, config.max_batch_tokens, config.batch_wait_ms / 1000,
                               self.metrics)

    def prepare(self, body: bytes, path: str) -> tuple[list[list[int]], list]:
        """(token ids of each text, row ids) of a request; run in a thread, off the event loop."""
        parsed, limit = parse_json(body), self.config.max_request_texts
        if path == "/get_reward":
            items, ids, where = query_items(parsed, limit, self.tokenizer.pad_token), [], "query"
        else:
            (items, ids), where = row_items(parsed, limit), "rows"
        return encode_items(self.tokenizer, items, self.limit, self.limit_name, where), ids

    async def rewards(self, body: bytes, path: str) -> dict[str, Any]:
        """The answer to a reward request, in input order."""
        self.batcher.arriving += 1
        try:
            sides, ids = await asyncio.to_thread(self.prepare, body, path)
        finally:
            self.batcher.arriving -= 1  # before submitting: the worker never waits for the very job it holds
        rewards = await asyncio.wrap_future(self.batcher.submit(sides))
        if not all(math.isfinite(reward) for reward in rewards):
            raise RuntimeError("some rewards are NaN or inf: the model's rewards are not finite (an adapter saved "
                               "from a diverged run?)")
        if self.normalization:
            rewards = [(reward - self.normalization["mean"]) / self.normalization["std"] for reward in rewards]
        if path == "/get_reward":
            return {"rewards": rewards, "scores": rewards, "normalization": self.normalization}
        results = [{"id": id_, "reward": reward} for id_, reward in zip(ids, rewards, strict=True)]
        return {"results": results, "normalization": self.normalization}


async def read_body(request, limit_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed the limit."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit_bytes:
        raise RequestError(413, f"the body has {int(declared)} bytes, over --max-request-mb "
                           f"({limit_bytes} bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit_bytes:
            raise RequestError(413, f"the body is over --max-request-mb ({limit_bytes} bytes)")
    return bytes(body)


class KeyAndCount:
    """ASGI middleware: the API key on every path but /health (401 otherwise), and every answer counted by path and
    status. Plain ASGI, not FastAPI's @app.middleware("http"), which costs every request a task and a stream."""

    def __init__(self, app, service: RewardService):
        from fastapi.responses import JSONResponse

        self.app, self.service = app, service
        self.refusal = JSONResponse({"error": "missing or wrong API key: send 'Authorization: Bearer <key>'"}, 401,
                                    headers={"WWW-Authenticate": "Bearer"})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1") or None
        if scope["path"] in OPEN_PATHS or authorized(header, self.service.config.api_key):
            await self.app(scope, receive, send_counted)
        else:
            await self.refusal(scope, receive, send_counted)
        self.service.metrics.observe_request(scope["path"] if scope["path"] in PATHS else "other", status["code"])


def build_app(service: RewardService):
    """The FastAPI app: KeyAndCount around it, the two reward routes, /health and /metrics.

    Routes are plain Starlette routes (the handler takes the request): the body is parsed and checked here, so that
    every bad input gets the same one-line {"error"} answer and 400, not FastAPI's 422 list.
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="lora-rm", docs_url=None, redoc_url=None, openapi_url=None)
    limit_bytes = int(service.config.max_request_mb * 2**20)

    app.add_middleware(KeyAndCount, service=service)

    @app.exception_handler(HTTPException)
    async def one_line_http_error(request, error: HTTPException):  # 404, 405: the same {"error"} shape
        return JSONResponse({"error": str(error.detail)}, error.status_code)

    async def answer_rewards(request):
        started = time.perf_counter()
        service.metrics.in_flight += 1
        try:
            answer = await service.rewards(await read_body(request, limit_bytes), request.url.path)
        except RequestError as error:
            return JSONResponse({"error": str(error)}, error.status)
        except Exception as error:  # the model failed: one line; the server goes on
            return JSONResponse({"error": " ".join(f"{type(error).__name__}: {error}".split())}, 500)
        finally:
            service.metrics.in_flight -= 1
        service.metrics.observe_rewards(len(answer.get("rewards") or answer["results"]), time.perf_counter() - started)
        return JSONResponse(answer)

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def metrics(request):
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    app.add_route("/get_reward", answer_rewards, methods=["POST"])
    app.add_route("/v1/rewards", answer_rewards, methods=["POST"])
    app.add_route("/health", health, methods=["GET"])
    app.add_route("/metrics", metrics, methods=["GET"])
    return app


# ---- running: bind, serve, stop on a signal ---------------------------------------------------------------------

def require_web_stack() -> None:
    """Fail before the model loads when FastAPI or uvicorn is missing, naming the extra that brings them."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise RuntimeError(f"lora-rm serve needs FastAPI and uvicorn ({error}): {EXTRA_HINT}") from None


def bind(host: str, port: int) -> tuple[socket.socket, str]:
    """A listening socket (port 0: a free one, chosen by the OS) and its URL; bound here, before uvicorn starts, so
    the URL printed is the one connections already queue on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not create_server's 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say TCP,
    # and with Nagle on, a response written as headers then body waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    address, bound_port = sock.getsockname()[:2]
    return sock, f"http://{f'[{address}]' if family == socket.AF_INET6 else address}:{bound_port}"


def serve(model, tokenizer, config: ServeConfig, max_length: int | None, packing: str,
          normalization: dict[str, float] | None = None) -> None:
    """Serve until SIGTERM or SIGINT; the requests in flight are answered before it returns."""
    import uvicorn

    warning = bind_warning(config.host, config.api_key)
    if warning:
        print(warning, file=sys.stderr)
    service = RewardService(model, tokenizer, config, max_length, packing, normalization)
    sock, url = bind(config.host, config.port)
    server = uvicorn.Server(uvicorn.Config(build_app(service), log_level="warning", access_log=False,
                                           lifespan="off"))
    # uvicorn re-raises the signal it stopped on after its graceful shutdown, so the previous handler runs: make that
    # one note the signal instead of killing the process (SIGTERM) or raising KeyboardInterrupt (SIGINT).
    signals: list[int] = []
    previous = {number: signal.signal(number, lambda received, frame: signals.append(received))
                for number in (signal.SIGINT, signal.SIGTERM)}
    service.batcher.start()
    print(f"lora-rm serve: listening on {url} (POST /get_reward, POST /v1/rewards, GET /health, GET /metrics)",
          flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        service.batcher.stop()
    stopped_by = signal.Signals(signals[0]).name if signals else "the server"
    print(f"lora-rm serve: stopped by {stopped_by} after answering every request in flight", flush=True)
