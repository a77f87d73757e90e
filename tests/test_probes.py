"""/health and /ready with a wedged engine, and a stream's status line waiting for its first token: a real server in
this process whose engine thread the test holds at a step boundary."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.test_deploy import wait_until


@pytest.fixture(scope="module")
def server(serve, llama):
    return serve(llama.settings(stall_seconds=1))


@pytest.fixture()
def held(server):
    """The server, its engine thread waiting on the returned event (set it to let the engine go)."""
    gate = threading.Event()
    server.state.engine.call(gate.wait)
    yield server, gate
    gate.set()
    wait_until(lambda: server.state.engine.stalled_for(time.monotonic()) == 0, 30, "the engine turning")
    server.state.broken = None  # held long enough, the engine counts as wedged


def _stream(url: str, path: str, body: dict, answer: dict) -> threading.Thread:
    def run():
        with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as response:
            answer["status_at"] = time.monotonic()
            answer["status"] = response.status_code
            answer["body"] = response.read()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 4}}),
        ("/v1/chat/completions", {"model": "lora", "messages": [{"role": "user", "content": "x"}], "stream": True}),
    ],
    ids=["native", "openai-chat"],
)
def test_a_stream_failing_before_its_first_token_gets_an_error_status_not_a_200(held, path, body):
    """While the engine is stuck the stream has no status line yet, /ready fails and /health still answers; the
    request then fails (the engine abandons it, as at a drain's end) with a 503 a balancer can retry elsewhere."""
    server, gate = held
    answer: dict = {}
    thread = _stream(server.url, path, body, answer)
    wait_until(lambda: httpx.get(f"{server.url}/ready", timeout=5).status_code == 503, 30, "/ready 503")
    ready = httpx.get(f"{server.url}/ready", timeout=5).json()
    assert "MIXSERVE_STALL_SECONDS" in str(ready), ready
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200  # the event loop answers
    assert "status" not in answer  # no token, no status line
    server.state.engine.abandon()
    gate.set()
    thread.join(30)
    assert answer["status"] == 503 and b"unavailable" in answer["body"]
    wait_until(lambda: httpx.get(f"{server.url}/ready", timeout=5).status_code == 200, 30, "/ready 200 again")


def test_a_stream_sends_its_status_line_with_its_first_token(held):
    server, gate = held
    answer: dict = {}
    thread = _stream(server.url, "/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 4}}, answer)
    wait_until(lambda: server.state.engine.queued == 1, 30, "the request queued")
    assert "status" not in answer
    released = time.monotonic()
    gate.set()
    thread.join(30)
    assert answer["status"] == 200 and answer["status_at"] > released
    assert answer["body"].count(b"data:") == 4


def test_broken_fails_health_and_ready(server):
    server.state.broken = "the GPU reported an unrecoverable error"
    try:
        for probe in ("/health", "/ready"):
            response = httpx.get(f"{server.url}{probe}", timeout=5)
            assert response.status_code == 503
            assert response.json() == {"error": server.state.broken, "error_type": "unavailable"}
    finally:
        server.state.broken = None


def test_an_engine_stuck_for_three_stall_periods_is_broken_and_fails_health(held):
    """/ready fails after MIXSERVE_STALL_SECONDS; 3 times that, /health fails too (the liveness probe restarts it)."""
    server, gate = held
    answer: dict = {}
    thread = _stream(server.url, "/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 4}}, answer)
    wait_until(lambda: httpx.get(f"{server.url}/health", timeout=5).status_code == 503, 30, "/health 503")
    assert "wedged" in httpx.get(f"{server.url}/health", timeout=5).json()["error"]
    assert server.state.engine.stalled_for(time.monotonic()) > 3 * server.state.settings.stall_seconds
    gate.set()
    thread.join(30)
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 503  # broken stays: a restart is the way out


def test_an_engine_thread_that_died_fails_health(server, monkeypatch):
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    monkeypatch.setattr(server.state.engine, "_thread", dead)
    try:
        response = httpx.get(f"{server.url}/health", timeout=5)
        assert response.status_code == 503 and "thread has died" in response.json()["error"]
    finally:
        monkeypatch.undo()
        server.state.broken = None
