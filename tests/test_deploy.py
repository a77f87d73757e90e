"""The deployment topology without a Docker engine: real replicas and a real nginx running the repo's config;
graceful drain on SIGTERM; and the Dockerfile, compose file and Kubernetes manifests agreeing with each other."""

from __future__ import annotations

import asyncio
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

from server.config import Settings
from tests.conftest import REPO

NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
SETTINGS_ENV = {f"MIXSERVE_{name.upper()}" for name in Settings.model_fields}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    def __init__(self, world, tmp: Path, name: str, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"{name}.log", "w")  # noqa: SIM115
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MIXSERVE_")}
        env = {
            "MIXSERVE_MODEL": str(world.model_dir),
            "MIXSERVE_ADAPTERS_DIR": str(world.store),
            "MIXSERVE_REPLICA_ID": name,
            **{k: str(v) for k, v in env.items()},
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "--port", str(self.port)],
            cwd=REPO,
            env={**clean, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def ready(self) -> Replica:
        wait_until(lambda: httpx.get(f"{self.url}/ready", timeout=1).status_code == 200, what="replica ready")
        return self

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self.log.close()


def render_nginx(tmp: Path, port: int, backends: list[int]) -> Path:
    text = NGINX_CONF.read_text()
    servers = "\n".join(f"        server 127.0.0.1:{b} max_fails=1 fail_timeout=5s;" for b in backends)
    text, replaced = re.subn(r"^\s*server mixserve:8000[^\n]*;", servers, text, flags=re.MULTILINE)
    assert replaced == 2
    text = text.replace("listen 80;", f"listen 127.0.0.1:{port};").replace(
        "pid /tmp/nginx.pid;", f"pid {tmp}/nginx.pid;"
    )
    path = tmp / "nginx.conf"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def topology(llama, tmp_path_factory):
    if shutil.which("nginx") is None:
        pytest.fail("nginx is not installed: `apt-get install nginx` (.ci/run and make test install it)")
    tmp = tmp_path_factory.mktemp("topology")
    replicas = [Replica(llama, tmp, f"r{i}") for i in range(2)]
    for replica in replicas:
        replica.ready()
    port = free_port()
    log = open(tmp / "nginx.out", "w")  # noqa: SIM115
    nginx = subprocess.Popen(
        ["nginx", "-p", str(tmp), "-c", str(render_nginx(tmp, port, [r.port for r in replicas])), "-g", "daemon off;"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/health", timeout=1).status_code == 200, what="nginx")
    yield url, replicas
    nginx.terminate()
    nginx.wait(30)
    log.close()
    for replica in replicas:
        replica.stop()


def _body(i: int, adapters: list[str]) -> dict:
    return {"inputs": f"request {i}", "adapters": adapters, "parameters": {"max_new_tokens": 12}}


COMBOS = [[], ["lora"], ["oft", "loha"], ["lokr", "shira", "adalora"], ["lora.rs-bias"]]


def test_mixed_traffic_through_nginx(topology):
    url, _ = topology

    async def traffic():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            plain = [client.post("/generate", json=_body(i, COMBOS[i % 5])) for i in range(15)]
            openai = [
                client.post(
                    "/v1/completions", json={"model": "oft+lora", "prompt": "x", "max_tokens": 4, "temperature": 0}
                )
                for _ in range(3)
            ]
            return await asyncio.gather(*plain, *openai)

    responses = asyncio.run(traffic())
    assert [r.status_code for r in responses] == [200] * 18
    assert {r.headers["x-replica"] for r in responses} == {"r0", "r1"}  # least connections spreads them
    with httpx.stream("POST", f"{url}/generate_stream", json=_body(0, ["oft"]), timeout=60) as response:
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert events[-1]["generated_text"] is not None and len(events) >= 1
    assert httpx.get(f"{url}/metrics", timeout=5).status_code == 404  # scraped per replica, not through the balancer
    assert httpx.get(f"{url}/operator", timeout=5).status_code == 404


def test_same_combination_lands_on_the_same_replica(topology):
    url, _ = topology
    placement = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        for combination in ["lora", "oft+lora", "loha", "shira+lokr", "adalora", "lora.patterns", "oft", "lokr"]:
            seen = set()
            for i in range(4):
                body = _body(i, combination.split("+"))
                response = client.post("/generate", json=body, headers={"X-Adapters": combination})
                assert response.status_code == 200
                seen.add(response.headers["x-replica"])
            assert len(seen) == 1, (combination, seen)
            placement[combination] = seen.pop()
    assert set(placement.values()) == {"r0", "r1"}  # the hash spreads combinations over the replicas


def test_killing_a_replica_mid_traffic_loses_no_request(topology):
    url, replicas = topology

    async def traffic():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            body = {"inputs": "survive", "parameters": {"max_new_tokens": 60, "ignore_eos_token": True}}
            tasks = [asyncio.create_task(client.post("/generate", json=body)) for _ in range(16)]
            await asyncio.sleep(0.4)  # both replicas are busy
            replicas[0].process.send_signal(signal.SIGKILL)
            return await asyncio.gather(*tasks)

    responses = asyncio.run(traffic())
    assert [r.status_code for r in responses] == [200] * 16
    assert all(r.json()["generated_text"] is not None for r in responses)
    with httpx.Client(base_url=url, timeout=60) as client:
        after = [
            client.post("/generate", json=_body(i, COMBOS[i % 5]), headers={"X-Adapters": "lora"}) for i in range(5)
        ]
    assert [r.status_code for r in after] == [200] * 5
    assert {r.headers["x-replica"] for r in after} == {"r1"}


def test_sigterm_drains_streams_refuses_new_work_and_exits_zero(llama, tmp_path):
    replica = Replica(llama, tmp_path, "drain", MIXSERVE_DRAIN_SECONDS=20).ready()
    events, started = [], threading.Event()

    def stream():
        body = {"inputs": "long", "parameters": {"max_new_tokens": 200, "ignore_eos_token": True}}
        with httpx.stream("POST", f"{replica.url}/generate_stream", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60)
    signalled = time.monotonic()
    replica.process.send_signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(f"{replica.url}/ready", timeout=1).status_code == 503, what="/ready 503")
    refused = httpx.post(f"{replica.url}/generate", json={"inputs": "new"}, timeout=10)
    assert (
        refused.status_code == 503 and refused.headers["retry-after"] and refused.json()["error_type"] == "unavailable"
    )
    assert httpx.get(f"{replica.url}/health", timeout=5).status_code == 200  # alive while it drains
    thread.join(60)
    assert len(events) == 200 and events[-1]["generated_text"] is not None  # the stream finished
    assert replica.process.wait(30) == 0
    assert time.monotonic() - signalled < 20 + 10
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


def test_compose_agrees_with_the_dockerfile_and_nginx():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    server, nginx = services["mixserve"], services["nginx"]
    assert server["deploy"]["replicas"] == 2 and server["build"]["args"]["VARIANT"] == "cpu"
    assert set(server["environment"]) <= SETTINGS_ENV
    assert {v.split(":")[1] for v in server["volumes"]} == {"/adapters", "/models"}
    assert all(v.endswith(":ro") for v in server["volumes"])
    assert server["expose"] == ["8000"] and "server mixserve:8000" in NGINX_CONF.read_text()
    assert "/ready" in " ".join(server["healthcheck"]["test"])
    drain = float(server["environment"]["MIXSERVE_DRAIN_SECONDS"])
    assert float(server["stop_grace_period"].rstrip("s")) > drain
    assert "./deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert nginx["ports"] == ["8080:80"] and "listen 80;" in NGINX_CONF.read_text()
    gpu = services["mixserve-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["networks"]["default"]["aliases"] == ["mixserve"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


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
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/models", "/adapters"}
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsUser"] == 10001 and "--uid 10001" in _dockerfile()
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    for name in ("hpa.yaml", "hpa-queue.yaml"):
        hpa = yaml.safe_load((k8s / name).read_text())
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
