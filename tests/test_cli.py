"""`python -m server`: settings from MIXSERVE_* variables and flags, and the real process serving."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from bench.common import listening_socket
from server.config import DEMO_MODEL_DIR, Settings
from tests.conftest import REPO

DEMO_ADAPTERS = ["signoff", "pirate", "digits", "british", "uppercase", "excited"]  # canonical order


def test_flags_override_environment(monkeypatch, llama):
    monkeypatch.setenv("MIXSERVE_PORT", "7000")
    monkeypatch.setenv("MIXSERVE_MAX_NEW_TOKENS", "33")
    monkeypatch.setenv("MIXSERVE_MODEL", str(llama.model_dir))
    settings = Settings(_cli_parse_args=["--port", "9000", "--max-adapters-per-request", "3", "--allow-pickle"])
    assert settings.port == 9000
    assert settings.max_new_tokens == 33
    assert settings.max_adapters_per_request == 3
    assert settings.allow_pickle is True
    assert settings.model_path == llama.model_dir


def test_defaults_are_the_embedded_demo(monkeypatch):
    for key in list(os.environ):
        if key.startswith("MIXSERVE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(REPO)
    settings = Settings(_cli_parse_args=[])
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.model_path == DEMO_MODEL_DIR
    assert settings.adapters_dir == REPO / "adapters_store"
    assert settings.max_adapters_per_request == 8


def test_adapters_per_request_are_clamped_to_what_can_be_resident(llama):
    settings = llama.settings(max_loaded_adapters=2)
    assert settings.max_adapters_per_request == 2
    assert settings.notes == [
        "MIXSERVE_MAX_ADAPTERS_PER_REQUEST (8) exceeds MIXSERVE_MAX_LOADED_ADAPTERS (2): clamped to 2"
    ]
    assert llama.settings(max_loaded_adapters=2, max_adapters_per_request=2).notes == []
    assert llama.settings().max_adapters_per_request == 8


def _wait_healthy(process: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError("server did not become healthy")


@pytest.fixture()
def launch():
    processes = []

    def start(args: list[str], env: dict[str, str]) -> str:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MIXSERVE_")}
        with listening_socket() as sock:
            port = sock.getsockname()[1]
            process = subprocess.Popen(
                [sys.executable, "-m", "server", "--listen-fd", str(sock.fileno()), *args],
                cwd=REPO,
                env={**clean, **env},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                pass_fds=[sock.fileno()],
            )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(process, url)
        return url

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


def test_demo_default_serves_every_type(launch):
    url = launch([], {})
    listed = httpx.get(f"{url}/adapters", params={"all": "true"}).json()["adapters"]
    assert {a["type"] for a in listed} >= {"LORA", "LOHA", "LOKR", "ADALORA", "OFT", "SHIRA"}
    response = httpx.post(
        f"{url}/generate",
        timeout=60,
        json={"inputs": "Hello", "adapters": list(reversed(DEMO_ADAPTERS)), "parameters": {"details": True}},
    )
    assert response.status_code == 200, response.text
    assert response.json()["details"]["adapters"] == DEMO_ADAPTERS


def test_environment_and_flags_configure_the_process(launch, llama):
    url = launch(
        ["--max-new-tokens", "5"], {"MIXSERVE_MODEL": str(llama.model_dir), "MIXSERVE_ADAPTERS_DIR": str(llama.store)}
    )
    ok = httpx.post(f"{url}/generate", json={"inputs": "Hi", "adapters": ["lora"]}, timeout=60)
    assert ok.status_code == 200, ok.text
    too_many = httpx.post(f"{url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 6}}, timeout=60)
    assert too_many.status_code == 422 and "at most 5" in too_many.json()["error"]


def test_invalid_settings_stop_the_process_with_the_reason(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "server", "--device", "tpu", "--model", str(tmp_path / "missing")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "device" in result.stderr and "is not a directory" in result.stderr


def test_a_listen_fd_that_is_not_an_open_socket_stops_the_process_with_the_reason():
    result = subprocess.run(
        [sys.executable, "-m", "server", "--listen-fd", "987"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "cannot start: MIXSERVE_LISTEN_FD=987 is not an open socket" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
