"""A replica's graceful drain on SIGTERM, and the Dockerfile, compose file, load balancer config and Kubernetes
manifests agreeing with each other (the replicas behind the load balancer: tests/test_balancer.py)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from bench.common import listening_socket
from server.config import Settings
from tests.conftest import REPO

HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
SETTINGS_ENV = {f"MIXSERVE_{name.upper()}" for name in Settings.model_fields}


def wait_until(check, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Replica:
    """`python -m server` on host:port (a free port of 127.0.0.1 by default) with the given MIXSERVE_* settings."""

    def __init__(self, tmp: Path, name: str, host: str = "127.0.0.1", port: int | None = None, **env):
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MIXSERVE_")}
        env = {"MIXSERVE_REPLICA_ID": name, **{k: str(v) for k, v in env.items()}}
        self.log = open(tmp / f"{name}.log", "w")  # noqa: SIM115
        with contextlib.ExitStack() as stack:
            if port is None:  # a socket bound here and inherited: no other process can take the port meanwhile
                sock = stack.enter_context(listening_socket())
                port, listen = sock.getsockname()[1], {"MIXSERVE_LISTEN_FD": str(sock.fileno())}
                inherited = [sock.fileno()]
            else:
                listen, inherited = {"MIXSERVE_HOST": host, "MIXSERVE_PORT": str(port)}, []
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server"],
                cwd=REPO,
                env={**clean, **env, **listen},
                stdout=self.log,
                stderr=subprocess.STDOUT,
                pass_fds=inherited,
            )
        self.host, self.port = host, port
        self.url = f"http://{host}:{self.port}"

    def ready(self) -> Replica:
        wait_until(lambda: httpx.get(f"{self.url}/ready", timeout=1).status_code == 200, what="replica ready")
        return self

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self.log.close()


def world_env(world) -> dict:
    return {"MIXSERVE_MODEL": world.model_dir, "MIXSERVE_ADAPTERS_DIR": world.store}


def test_sigterm_drains_streams_refuses_new_work_and_exits_zero(llama, tmp_path):
    replica = Replica(tmp_path, "drain", MIXSERVE_DRAIN_SECONDS=20, **world_env(llama)).ready()
    events, started = [], threading.Event()

    def stream():
        body = {"inputs": "long", "parameters": {"max_new_tokens": 200, "ignore_eos_token": True}}
        with httpx.stream("POST", f"{replica.url}/generate_stream", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    started.set()

    # a request still sending its body is in flight too: it holds the drain open while the checks below run (the
    # stream alone may finish first, and the replica exit); sent before the stream, so it is in flight once the
    # stream's first event is out
    held = socket.create_connection((replica.host, replica.port), timeout=30)
    held.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 99\r\n\r\n{")
    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60)
    signalled = time.monotonic()
    replica.process.send_signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(f"{replica.url}/ready", timeout=1).status_code == 404, what="/ready 404")
    refused = httpx.post(f"{replica.url}/generate", json={"inputs": "new"}, timeout=10)
    assert (
        refused.status_code == 503 and refused.headers["retry-after"] and refused.json()["error_type"] == "unavailable"
    )
    assert httpx.get(f"{replica.url}/health", timeout=5).status_code == 200  # alive while it drains
    thread.join(60)
    assert len(events) == 200 and events[-1]["generated_text"] is not None  # the stream finished
    held.close()
    assert replica.process.wait(30) == 0
    assert time.monotonic() - signalled < 20 + 10
    replica.stop()


def test_a_stream_still_open_when_the_drain_ends_gets_an_error_event_not_a_cut(llama, tmp_path):
    replica = Replica(tmp_path, "drain", MIXSERVE_DRAIN_SECONDS=0, **world_env(llama)).ready()
    body = {"inputs": "long", "parameters": {"max_new_tokens": 240, "ignore_eos_token": True}}  # the context: 256
    events = []
    with httpx.stream("POST", f"{replica.url}/generate_stream", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if len(events) == 1:
                    replica.process.send_signal(signal.SIGTERM)
    assert events[-1] == {"error": "the server is shutting down", "error_type": "unavailable"}
    assert 1 <= len(events) - 1 < 240 and all(e["generated_text"] is None for e in events[:-1])
    assert replica.process.wait(30) == 0
    replica.stop()


# --- the files agree


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_dockerfile_is_multi_stage_non_root_with_healthcheck_and_volumes():
    text = _dockerfile()
    assert len(re.findall(r"^FROM ", text, flags=re.MULTILINE)) >= 4
    assert "nvidia/cuda" in text and "ARG VARIANT=cuda" in text and "download.pytorch.org/whl/cpu" in text
    assert re.search(r"^USER (?!root)\w+", text, flags=re.MULTILINE)
    assert re.search(r"^EXPOSE 8000$", text, flags=re.MULTILINE)
    assert "HEALTHCHECK" in text and "/health" in text
    assert 'VOLUME ["/models", "/adapters"]' in text
    assert all(p in text for p in ("python3.11-dev", " gcc ", " g++ ")), "torch.compile compiles at run time"
    assert set(re.findall(r"\b(MIXSERVE_[A-Z_]+)=", text)) <= SETTINGS_ENV
    assert "MIXSERVE_PORT=8000" in text and "MIXSERVE_ADAPTERS_DIR=/adapters" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "tests"} <= set(ignored)


def test_compose_agrees_with_the_dockerfile_and_the_balancer():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    server, balancer = services["mixserve"], services["balancer"]
    config = HAPROXY_CFG.read_text()
    assert server["deploy"]["replicas"] == 2 and server["build"]["args"]["VARIANT"] == "cpu"
    assert set(server["environment"]) <= SETTINGS_ENV
    assert {v.split(":")[1] for v in server["volumes"]} == {"/adapters", "/models"}
    assert all(v.endswith(":ro") for v in server["volumes"])
    assert server["expose"] == ["8000"] and config.count("server-template mixserve 1-16 mixserve:8000") == 2
    assert "nameserver dns 127.0.0.11:53" in config  # Docker's DNS: every container of the service
    assert "/ready" in " ".join(server["healthcheck"]["test"]) and "option httpchk GET /ready" in config
    assert "http-check disable-on-404" in config  # /ready's 404 while draining: no new requests, streams kept
    drain = float(server["environment"]["MIXSERVE_DRAIN_SECONDS"])
    assert float(server["stop_grace_period"].rstrip("s")) > drain
    assert "./deploy/haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in balancer["volumes"]
    assert balancer["ports"] == ["8080:8080"] and "bind :8080" in config
    gpu = services["mixserve-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["networks"]["default"]["aliases"] == ["mixserve"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_the_balancer_config_is_valid_for_the_installed_haproxy():
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed: `apt-get install haproxy` (.ci/run and make test install it)")
    checked = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_kubernetes_manifests_agree_with_the_image_and_each_other():
    k8s = REPO / "deploy" / "k8s"
    deployment = yaml.safe_load((k8s / "deployment.yaml").read_text())
    service = yaml.safe_load((k8s / "service.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert set(env) - {"OMP_NUM_THREADS"} <= SETTINGS_ENV
    threads = next(e for e in container["env"] if e["name"] == "OMP_NUM_THREADS")["valueFrom"]["resourceFieldRef"]
    assert threads["resource"] == "requests.cpu"  # torch's threads: the CPUs the pod asks for
    assert pod["terminationGracePeriodSeconds"] > float(env["MIXSERVE_DRAIN_SECONDS"])
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # a hung process fails them by timing out
        assert container[probe]["timeoutSeconds"] < container[probe]["periodSeconds"]
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 5  # out of the endpoints within ~5 s
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/models", "/adapters"}
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsUser"] == 10001 and "--uid 10001" in _dockerfile()
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    for name in ("hpa.yaml", "hpa-queue.yaml"):
        hpa = yaml.safe_load((k8s / name).read_text())
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
