"""`lora-rm serve`: the real server in a subprocess on a free loopback port, talked to over HTTP.

One server (a trained built-in adapter, an API key) is shared by the module; the SIGTERM test starts its own on a
stock model folder (no adapter). The port is chosen by the OS (--port 0) and read from the line the server prints
once its socket listens, so there is no window in which another process could take it.
"""

import asyncio
import contextlib
import http.client
import io
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from runs import stock_model_folder

from lora_rm import load_adapter
from lora_rm.builtin import builtin_model, builtin_tokenizer
from lora_rm.cli import main
from lora_rm.config import ServeConfig
from lora_rm.evaluate import score_texts
from lora_rm.model_io import load_model_and_tokenizer

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from lora_rm import serve  # noqa: E402  (after the skip: the module itself imports FastAPI only when serving)

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
TINY_TRAIN = ["--max-rows", "80", "--max-steps", "4", "--batch-size", "4", "--lora-r", "4", "--no-progress"]
START_TIMEOUT = 300  # seconds for the server to load and listen on a busy machine
# Mixed lengths, from 3 to 30 tokens with <s> and </s> (--max-length 32).
TEXTS = ["What is 1 + 2 ? 3", "7", "What is 9 + 9 ? 18", "What is 1 + 2 + 3 + 4 + 5 + 6 ? 21",
         "What is 4 + 4 ? 9", "What is 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 ? 13", "is", "? 5"]


def start_server(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, queue.Queue]:
    """`python -m lora_rm serve --port 0 ...`: the process, its URL, and a queue of its later stdout lines."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    process = subprocess.Popen([sys.executable, "-m", "lora_rm", "serve", "--port", "0", *args], env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout] + [lines.put(None)],
                     daemon=True).start()
    said = []
    while True:
        line = lines.get(timeout=START_TIMEOUT)
        if line is None:
            raise AssertionError(f"the server exited before listening: {''.join(said)}")
        said.append(line)
        if "listening on http://" in line:
            return process, line.split("listening on ")[1].split()[0], lines


def stop_server(process: subprocess.Popen, lines: queue.Queue, sig: int | None) -> tuple[int, str]:
    """Send the signal (None: it was sent); (exit code, what the server printed after listening)."""
    if sig is not None:
        process.send_signal(sig)
    code = process.wait(timeout=120)
    said = []
    while (line := lines.get(timeout=30)) is not None:
        said.append(line)
    return code, "".join(said)


def request(url: str, method: str, path: str, body: bytes | dict | None = None, key: str | None = KEY,
            headers: dict[str, str] | None = None) -> tuple[int, dict | str]:
    """One HTTP request on a fresh connection: (status, parsed JSON, or text for /metrics)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    payload = json.dumps(body).encode() if isinstance(body, dict) else body
    sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    try:
        connection.request(method, path, body=payload, headers=sent)
        response = connection.getresponse()
        text = response.read().decode()
    finally:
        connection.close()
    return response.status, (text if path == "/metrics" and response.status == 200 else json.loads(text))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A built-in reward model trained for four steps (adapter, reward_stats.json, tokenizer)."""
    output = tmp_path_factory.mktemp("serve") / "run"
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        main(["train", "--output", str(output), *TINY_TRAIN])
    return output


@pytest.fixture(scope="module")
def server(trained):
    """The module's server: the trained adapter, the key from LORA_RM_API_KEY, small limits to hit; stopped with
    SIGINT at the end, which must exit 0."""
    process, url, lines = start_server(
        "--adapter", str(trained), "--max-length", "32", "--max-request-texts", "64", "--max-request-mb", "0.05",
        "--max-batch-size", "16", "--batch-wait-ms", "10", env={"LORA_RM_API_KEY": KEY})
    yield url
    code, said = stop_server(process, lines, signal.SIGINT)
    assert code == 0 and "stopped by SIGINT" in said, said


@pytest.fixture(scope="module")
def expected(trained):
    """Each text's reward scored alone (no batch companions) through score_texts, the function `score` calls."""
    tokenizer = builtin_tokenizer()
    model = load_adapter(builtin_model(tokenizer), trained).eval()
    return {text: score_texts(model, tokenizer, [text])[0] for text in TEXTS}


@pytest.mark.slow
def test_rewards_equal_lora_rm_score_on_mixed_lengths(server, trained, expected, tmp_path, capsys):
    inputs = tmp_path / "texts.txt"
    inputs.write_text("\n".join(TEXTS) + "\n")
    capsys.readouterr()
    main(["score", "--adapter", str(trained), "--input", str(inputs), "--max-length", "32"])
    scored = [float(line) for line in capsys.readouterr().out.split()]
    status, answer = request(server, "POST", "/get_reward", {"query": TEXTS, "prompts": ["ignored"]})
    assert status == 200 and answer["normalization"] is None
    assert answer["rewards"] == pytest.approx(scored, abs=1e-5) and answer["scores"] == answer["rewards"]
    assert answer["rewards"] == pytest.approx([expected[text] for text in TEXTS], abs=1e-5)
    assert len(set(answer["rewards"])) > 1  # not a constant model
    # OpenRLHF sends decoded, left-padded sequences: the pad tokens are stripped as its own serve_rm does
    status, padded = request(server, "POST", "/get_reward", {"query": ["<pad><pad>" + TEXTS[0]]})
    assert padded["rewards"] == pytest.approx([expected[TEXTS[0]]], abs=1e-5)
    rows = [TEXTS[0], {"text": TEXTS[2], "id": "b"}, {"prompt": "What is 4 + 4 ?", "response": " 9", "id": 7},
            {"messages": [{"role": "user", "content": "What is 1 + 2 ?"}, {"role": "assistant", "content": "3"}]},
            {"prompt": [{"role": "user", "content": "What is 1 + 2 ?"}],
             "response": [{"role": "assistant", "content": "3"}]}]
    status, answer = request(server, "POST", "/v1/rewards", {"rows": rows})
    assert status == 200 and [result["id"] for result in answer["results"]] == [0, "b", 7, 3, 4]
    rewards = [result["reward"] for result in answer["results"]]
    assert rewards[:3] == pytest.approx([expected[TEXTS[0]], expected[TEXTS[2]], expected[TEXTS[4]]], abs=1e-5)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": rows[3]["messages"]}) + "\n")
    main(["score", "--adapter", str(trained), "--input", str(chat), "--max-length", "32"])
    assert rewards[3:] == pytest.approx([float(capsys.readouterr().out)] * 2, abs=1e-5)


@pytest.mark.slow
def test_concurrent_clients_each_get_their_own_rewards(server, expected):
    """8 clients x 25 requests of 1 to 3 texts each, at once: every answer holds its own texts' rewards, in order."""
    failures, answered = [], []

    def client(number: int) -> None:
        for i in range(25):
            texts = [TEXTS[(number * 7 + i * 3 + j) % len(TEXTS)] for j in range(1 + (number + i) % 3)]
            status, answer = request(server, "POST", "/get_reward", {"query": texts})
            if status != 200 or answer["rewards"] != pytest.approx([expected[t] for t in texts], abs=1e-5):
                failures.append((number, i, texts, status, answer))
            answered.append(1)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert failures == [] and len(answered) == 200
    status, metrics = request(server, "GET", "/metrics")
    assert status == 200 and 'lora_rm_requests_total{path="/get_reward",status="200"}' in metrics
    assert "lora_rm_batch_size_bucket{le=\"+Inf\"}" in metrics and "lora_rm_request_latency_seconds_count" in metrics


BAD_INPUTS = [  # (path, body, extra headers, status, words the one-line error must contain)
    ("/get_reward", b'{"query": ["What is 1', {}, 400, "not valid JSON"),
    ("/get_reward", b"\xff\xfe", {}, 400, "not valid JSON"),
    ("/get_reward", b'["What is 1 + 2 ? 3"]', {}, 400, "JSON object, not list"),
    ("/get_reward", b'{"texts": ["What is 1 + 2 ? 3"]}', {}, 400, "missing field 'query'"),
    ("/get_reward", b'{"query": "What is 1 + 2 ? 3"}', {}, 400, "'query' must be a list"),
    ("/get_reward", b'{"query": ["What is 1 + 2 ? 3", 5]}', {}, 400, "query[1] must be a string, not int"),
    ("/get_reward", b'{"query": []}', {}, 400, "'query' is empty"),
    ("/get_reward", json.dumps({"query": ["7"] * 65}).encode(), {}, 413, "over --max-request-texts 64"),
    ("/get_reward", json.dumps({"query": ["7" * 60000]}).encode(), {}, 413, "over --max-request-mb"),
    ("/get_reward", json.dumps({"query": ["What is" + " 1 +" * 20 + " 1 ? 21"]}).encode(), {}, 400,
     "over --max-length 32 tokens, the first query[0] with 47: refused, as `lora-rm score` refuses them"),
    ("/v1/rewards", b'{"query": ["7"]}', {}, 400, "missing field 'rows'"),
    ("/v1/rewards", b'{"rows": [{"prompt": "What is 1 + 2 ?"}]}', {}, 400,
     "rows[0]: a JSON object needs a 'text', 'messages', or 'prompt' and 'response' field"),
    ("/v1/rewards", b'{"rows": ["7", {"text": 5}]}', {}, 400, "rows[1]: 'text' must be a string, not int"),
    ("/v1/rewards", b'{"rows": [{"messages": [{"content": "7"}]}]}', {}, 400, "rows[0]: messages is not a list of"),
    ("/v1/rewards", b'{"rows": [{"prompt": "What is 1 + 2 ?", "response": [{"role": "assistant", "content": "3"}]}]}',
     {}, 400, "rows[0]: prompt is not a list of {role, content} messages"),
]


@pytest.mark.slow
def test_every_bad_input_is_one_line_json_and_the_server_keeps_serving(server, expected):
    for path, body, headers, status, words in BAD_INPUTS:
        got_status, answer = request(server, "POST", path, body, headers=headers)
        assert (got_status, list(answer)) == (status, ["error"]), (path, body[:60], answer)
        assert words in answer["error"] and "\n" not in answer["error"], answer["error"]
    # a body over the limit without a Content-Length (chunked) is cut off as it arrives
    parts = urlsplit(server)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    chunks = iter([b'{"query": ["', b"7" * 40000, b"7" * 40000, b'"]}'])
    connection.request("POST", "/get_reward", body=chunks, headers={"Authorization": f"Bearer {KEY}"},
                       encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and "over --max-request-mb" in json.loads(response.read())["error"]
    connection.close()
    assert request(server, "GET", "/get_reward")[0] == 405 and request(server, "GET", "/nowhere")[0] == 404
    status, answer = request(server, "POST", "/get_reward", {"query": TEXTS[:2]})
    assert status == 200 and answer["rewards"] == pytest.approx([expected[t] for t in TEXTS[:2]], abs=1e-5)


@pytest.mark.slow
def test_the_api_key_guards_everything_but_health(server):
    body = {"query": [TEXTS[0]]}
    for key in (None, "wrong-key"):
        for method, path in [("POST", "/get_reward"), ("POST", "/v1/rewards"), ("GET", "/metrics"),
                             ("GET", "/nowhere")]:
            status, answer = request(server, method, path, body if method == "POST" else None, key=key)
            assert status == 401 and "API key" in answer["error"], (key, path)
    assert request(server, "GET", "/health", key=None) == (200, {"status": "ok"})
    assert request(server, "POST", "/get_reward", body)[0] == 200
    status, metrics = request(server, "GET", "/metrics")
    assert 'lora_rm_requests_total{path="other",status="401"}' in metrics  # unknown paths share one label


@pytest.mark.slow
def test_sigterm_answers_the_request_in_flight_then_exits_0(tmp_path):
    """A stock one-label model (no --adapter). A request whose body is half sent when SIGTERM arrives is still
    answered, with `score`'s rewards, when the rest arrives after the server stopped accepting; then it exits 0.
    No timing: the test waits for /metrics to show the request in flight, then for connections to be refused."""
    folder = tmp_path / "stock-rm"
    stock_model_folder(folder)
    process, url, lines = start_server("--model", str(folder), "--max-length", "32")
    parts = urlsplit(url)
    body = json.dumps({"query": TEXTS[:3]}).encode()
    held = socket.create_connection((parts.hostname, parts.port), timeout=120)
    held.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
    for _ in range(6000):  # until the server is reading that request (bounded: 6000 polls)
        if "lora_rm_reward_requests_in_flight 1" in request(url, "GET", "/metrics", key=None)[1]:
            break
    else:
        raise AssertionError("the request never showed as in flight")
    process.send_signal(signal.SIGTERM)
    for _ in range(6000):  # until the server has stopped accepting: it is shutting down, the request still open
        try:
            socket.create_connection((parts.hostname, parts.port), timeout=120).close()
        except ConnectionRefusedError:
            break
    else:
        raise AssertionError("the server kept accepting connections after SIGTERM")
    held.sendall(body[10:])
    response = http.client.HTTPResponse(held)
    response.begin()
    answer = json.loads(response.read())
    held.close()
    code, said = stop_server(process, lines, None)
    assert code == 0 and "stopped by SIGTERM" in said, said
    model, tokenizer = load_model_and_tokenizer(str(folder))
    assert response.status == 200
    assert answer["rewards"] == pytest.approx(score_texts(model.eval(), tokenizer, TEXTS[:3]), abs=1e-5)


@pytest.mark.parametrize("packing", ["none", "auto"])
def test_a_reward_does_not_depend_on_its_batch_companions(trained, expected, packing):
    """score_texts, which the server batches through: alone, or right-padded / packed among longer and shorter
    texts in any order, a text's fp32 reward moves by less than 1e-5."""
    tokenizer = builtin_tokenizer()
    model = load_adapter(builtin_model(tokenizer), trained).eval()
    for order in (TEXTS, TEXTS[::-1], sorted(TEXTS, key=len)):
        rewards = score_texts(model, tokenizer, order, batch_size=len(order), packing=packing)
        assert rewards == pytest.approx([expected[text] for text in order], abs=1e-5, rel=0)


def test_a_text_longer_than_the_position_table_is_refused_before_it_reaches_a_batch(trained):
    """The built-in model has 64 positions; with --max-length 512 a 70-token text would fail its whole batch."""
    tokenizer = builtin_tokenizer()
    model = load_adapter(builtin_model(tokenizer), trained).eval()
    service = serve.RewardService(model, tokenizer, ServeConfig(), 512, "auto", None)
    body = json.dumps({"query": [TEXTS[0], "What is" + " 1 +" * 33 + " 1 ? 34"]}).encode()
    with pytest.raises(serve.RequestError, match=r"^1 text\(s\) over the model's max_position_embeddings \(64; "
                                                 r"--max-length is 512\) tokens, the first query\[1\] with 73"):
        service.prepare(body, "/get_reward")


def test_batches_are_sorted_by_length_within_both_budgets():
    job = serve.Job(sides=[[7] * n for n in (5, 1, 9, 3, 3, 30, 2)])
    texts = [serve.Text(job, index, len(ids)) for index, ids in enumerate(job.sides)]
    batches = serve.plan_batches(texts, max_size=3, max_tokens=20)
    assert [[text.length for text in batch] for batch in batches] == [[1, 2, 3], [3, 5], [9], [30]]
    assert sorted(text.index for batch in batches for text in batch) == list(range(7))  # each text exactly once


def test_normalize_uses_the_runs_reward_stats(trained, expected):
    """In process (no HTTP): --normalize answers (r - mean) / std with reward_stats.json's numbers, and says so."""
    stats = json.loads((trained / "reward_stats.json").read_text())
    assert serve.read_reward_stats(trained) == stats
    tokenizer = builtin_tokenizer()
    model = load_adapter(builtin_model(tokenizer), trained).eval()
    service = serve.RewardService(model, tokenizer, ServeConfig(normalize=True), 32, "auto", stats)
    service.batcher.start()
    try:
        answer = asyncio.run(service.rewards(json.dumps({"query": TEXTS[:2]}).encode(), "/get_reward"))
    finally:
        service.batcher.stop()
    assert answer["normalization"] == stats
    assert answer["rewards"] == pytest.approx([(expected[t] - stats["mean"]) / stats["std"] for t in TEXTS[:2]],
                                              abs=1e-4)
    with pytest.raises(ValueError, match="give --adapter"):
        serve.read_reward_stats(None)
    with pytest.raises(ValueError, match="reward_stats.json not found"):
        serve.read_reward_stats(trained / "checkpoints")


def test_binding_beyond_loopback_without_a_key_warns():
    assert serve.bind_warning("0.0.0.0", None).startswith("lora-rm serve: warning: binding 0.0.0.0")
    assert serve.bind_warning("10.1.2.3", None) and serve.bind_warning("example.org", None)
    assert serve.bind_warning("0.0.0.0", KEY) is None
    assert all(serve.bind_warning(host, None) is None for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"))
    assert serve.authorized(f"Bearer {KEY}", KEY) and not serve.authorized(None, KEY)
    assert not serve.authorized(f"Bearer {KEY}x", KEY) and serve.authorized(None, None)


def test_a_missing_web_stack_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    with pytest.raises(SystemExit, match=r"^lora-rm: error: lora-rm serve needs FastAPI and uvicorn .*"
                                         r"pip install 'lora-rm\[serve\]'"):
        main(["serve", "--adapter", "no-such-folder"])


@pytest.mark.parametrize(("flags", "words"), [
    (["--max-batch-size", "0"], "--max-batch-size must be at least 1"),
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--batch-wait-ms", "-1"], "--batch-wait-ms must be at least 0"),
    (["--max-length", "1"], "--max-length must be at least 2"),
])
def test_bad_serve_flags_are_usage_errors(flags, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *flags])
    assert exit_info.value.code == 2 and words in capsys.readouterr().err


def test_normalize_without_a_run_folder_fails_before_loading():
    with pytest.raises(SystemExit, match="--normalize reads reward_stats.json from the run folder given as --adapter"):
        main(["serve", "--normalize"])
