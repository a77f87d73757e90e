"""Replicas behind the shipped load balancer, faults injected by signal: deploy/haproxy/haproxy.cfg run by Debian's
HAProxy, replicas of the demo model found by DNS as compose's are (a DNS server here answers the name `mixserve`
with their loopback addresses, as Docker's does with the containers'). Each scenario runs a bounded load of plain
and streamed requests (native and OpenAI, with and without X-Adapters) and compares every answer with the one a
healthy replica gives directly. One fleet serves the scenarios in order: scale-up 2 -> 3 (one without an adapter),
the missing adapter, SIGTERM then a restart on a new address, SIGSTOP, SIGKILL. Each prints what it cost clients
(run with -s); README "Deploying" quotes those numbers."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from server.api import serving
from tests.conftest import REPO
from tests.test_deploy import Replica, wait_until

HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
DEMO_STORE = REPO / "adapters_store"
COMBOS = ["", "digits", "digits+uppercase", "british", "excited+signoff", "signoff+british"]  # on every replica
STOP_SECONDS = 20  # SIGSTOP: long enough that a client stuck with the stopped replica would be seen waiting


class Dns:
    """A DNS server on loopback that answers every A query with `addresses` and every other query with none."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, client = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            end = query.index(b"\0", 12) + 5  # the question: the name's labels, its type and class
            (qtype,) = struct.unpack(">H", query[end - 4 : end - 2])
            ips = list(self.addresses) if qtype == 1 else []
            header = query[:2] + struct.pack(">HHHHH", 0x8180, 1, len(ips), 0, 0)
            answers = b"".join(struct.pack(">HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(ip) for ip in ips)
            self.sock.sendto(header + query[12:end] + answers, client)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class Fleet:
    """HAProxy with the repo's config, and replicas on 127.0.0.<n>, all on one port, found through the Dns."""

    def __init__(self, tmp: Path, port: int | None = None, stream_timeout: str = "30s"):
        self.tmp = tmp
        self.dns = Dns()
        self.port = port or _free_port_on(["127.0.0.1", *(f"127.0.0.{n}" for n in range(2, 10))])
        self.replicas: dict[str, Replica] = {}  # by address
        self.references: dict[Call, str] = {}
        self.lb_port = _free_port_on(["127.0.0.1"])
        self.url = f"http://127.0.0.1:{self.lb_port}"
        self.admin = tmp / "admin.sock"
        self.store_without_pirate = tmp / "store-without-pirate"
        shutil.copytree(DEMO_STORE, self.store_without_pirate, ignore=lambda d, _: ["pirate"] * (d == str(DEMO_STORE)))
        config = HAPROXY_CFG.read_text()
        rendered = (
            config.replace("bind :8080", f"bind 127.0.0.1:{self.lb_port}")
            .replace("127.0.0.11:53", f"127.0.0.1:{self.dns.port}")
            .replace("mixserve:8000", f"mixserve:{self.port}")
            .replace("global\n", f"global\n    stats socket {self.admin} level admin\n", 1)
            .replace("set-timeout server 30s", f"set-timeout server {stream_timeout}")
        )
        assert rendered.count(f"mixserve:{self.port}") == 2 and f"127.0.0.1:{self.dns.port}" in rendered
        assert rendered.count(f"set-timeout server {stream_timeout} ") == 2
        (tmp / "haproxy.cfg").write_text(rendered)
        self.log = open(tmp / "haproxy.log", "w")  # noqa: SIM115
        self.haproxy = subprocess.Popen(
            ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")], stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_until(self.admin.exists, timeout=30, what="haproxy's admin socket")

    def start(self, n: int, name: str = "", store: Path = DEMO_STORE) -> Replica:
        """A replica on 127.0.0.<n>, in the DNS answer from now on (as a container is once started)."""
        address = f"127.0.0.{n}"
        replica = Replica(self.tmp, name or f"r{n}", host=address, port=self.port, MIXSERVE_ADAPTERS_DIR=store)
        self.replicas[address] = replica
        self.dns.addresses.append(address)
        return replica

    def forget(self, replica: Replica) -> None:
        """Out of the DNS answer (its container is gone)."""
        self.dns.addresses.remove(replica.host)

    def up(self, either: bool = False) -> set[str]:
        """The addresses of the replicas both backends (with and without X-Adapters), or `either`, see UP."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.admin))
            s.sendall(b"show stat\n")
            text = b"".join(iter(lambda: s.recv(65536), b"")).decode()
        header = text.splitlines()[0].lstrip("# ").split(",")
        backend, status, addr = header.index("pxname"), header.index("status"), header.index("addr")
        rows = [line.split(",") for line in text.splitlines() if line.startswith("mixserve_")]
        up = {(row[backend], row[addr].rsplit(":", 1)[0]) for row in rows if row[addr] and row[status].startswith("UP")}
        any_, affinity = {a for b, a in up if b == "mixserve_any"}, {a for b, a in up if b == "mixserve_affinity"}
        return any_ | affinity if either else any_ & affinity

    def wait_serving(self, addresses: set[str], timeout: float = 60) -> None:
        wait_until(lambda: self.up() == addresses, timeout=timeout, what=f"the balancer to use {sorted(addresses)}")

    def check(self, outcomes: list[Outcome]) -> None:
        """Every complete answer is the one r2 (the demo store's, all adapters) gives to that request directly."""
        missing = {o.call.reference() for o in outcomes if o.call.reference() not in self.references}

        async def ask():
            async with httpx.AsyncClient(base_url=self.replicas["127.0.0.2"].url, timeout=60) as client:
                return await asyncio.gather(*(_send(client, call) for call in missing))

        for reference in asyncio.run(ask()):
            assert reference.text is not None, reference
            self.references[reference.call] = reference.text
        for outcome in outcomes:
            assert outcome.text is None or outcome.text == self.references[outcome.call.reference()], outcome

    def close(self) -> None:
        self.haproxy.terminate()
        self.haproxy.wait(30)
        self.log.close()
        for replica in self.replicas.values():
            replica.stop()
        self.dns.close()


def _free_port_on(addresses: list[str]) -> int:
    while True:
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        try:
            for address in addresses[1:]:
                with socket.socket() as s:
                    s.bind((address, port))
            return port
        except OSError:
            continue


# --- requests and what their clients got


@dataclass(frozen=True)
class Call:
    api: str  # generate | tgi_stream | completion | completion_stream | chat_stream
    combo: str
    prompt: str
    affinity: bool  # sends X-Adapters
    tokens: int = 40

    @property
    def streamed(self) -> bool:
        return self.api.endswith("stream")

    def reference(self) -> Call:
        """The request whose answer this one's must equal (the same tokens, not streamed, no header)."""
        api = {"tgi_stream": "generate", "completion_stream": "completion"}.get(self.api, self.api)
        return Call(api, self.combo, self.prompt, affinity=False, tokens=self.tokens)

    def request(self) -> tuple[str, dict, dict]:
        headers = {"X-Adapters": self.combo} if self.affinity else {}
        adapters = self.combo.split("+") if self.combo else []
        params = {"max_new_tokens": self.tokens, "ignore_eos_token": True}
        if self.api in ("generate", "tgi_stream"):
            body = {"inputs": self.prompt, "adapters": adapters, "parameters": params}
            path = "/generate" if self.api == "generate" else "/"
            return path, body | {"stream": self.api == "tgi_stream"}, headers
        openai = {"model": self.combo or "mixserve-demo", "max_tokens": self.tokens, "temperature": 0}
        openai |= {"stream": self.streamed}
        if self.api == "chat_stream":
            return "/v1/chat/completions", openai | {"messages": [{"role": "user", "content": self.prompt}]}, headers
        return "/v1/completions", openai | {"prompt": self.prompt}, headers


@dataclass
class Outcome:
    call: Call
    status: int | None = None
    text: str | None = None  # the whole answer; None when the client did not get one
    events: int = 0  # data events received (streams)
    failure: str | None = None  # what the client saw instead of an answer
    replica: str | None = None
    seconds: float = 0.0
    sent_at: float = field(default_factory=time.monotonic)


APIS = ["generate", "tgi_stream", "completion", "completion_stream", "chat_stream", "generate"]


def calls(n: int, tokens: int = 24, combos: list[str] = COMBOS) -> list[Call]:
    """n requests cycling through the APIs, the combinations and 7 prompts; every third sends X-Adapters."""
    return [
        Call(APIS[i % 6], combos[(i + i // 6) % len(combos)], f"q{i % 7}", affinity=i % 3 == 0, tokens=tokens)
        for i in range(n)
    ]


async def _send(client: httpx.AsyncClient, call: Call, load: Load | None = None) -> Outcome:
    path, body, headers = call.request()
    outcome = Outcome(call)
    try:
        async with client.stream("POST", path, json=body, headers=headers) as response:
            outcome.status, outcome.replica = response.status_code, response.headers.get("x-replica")
            if response.status_code != 200 or not call.streamed:
                await response.aread()
                if response.status_code != 200:
                    outcome.failure = f"{response.status_code} {response.text[:200]}"
                else:
                    outcome.text = _answer(call, response.json())
            else:
                events = []
                try:
                    async for line in response.aiter_lines():
                        if line.startswith("data:"):
                            events.append(line[5:].strip())
                            outcome.events += 1
                            if load is not None and outcome.events == 1:
                                load.streaming[outcome.replica] += 1
                                load.started.set()
                finally:
                    if load is not None and outcome.events:
                        load.streaming[outcome.replica] -= 1
                outcome.text, outcome.failure = _streamed_answer(call, events)
    except httpx.HTTPError as exc:
        outcome.failure = f"{type(exc).__name__} after {outcome.events} events"
    outcome.seconds = time.monotonic() - outcome.sent_at
    await asyncio.sleep(0)
    return outcome


async def _send_once(url: str, call: Call) -> Outcome:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await _send(client, call)


def _answer(call: Call, body) -> str:
    if call.api == "generate":
        return body["generated_text"]
    return body["choices"][0]["text"]


def _streamed_answer(call: Call, events: list[str]) -> tuple[str | None, str | None]:
    """The text of a complete stream, or what shows the client it was cut: TGI's streams end with an event that
    carries generated_text, OpenAI's with [DONE]; an error event carries `error`."""
    if call.api == "tgi_stream":
        chunks = [json.loads(e) for e in events]
        if any("error" in c for c in chunks):
            return None, f"error event after {len(chunks) - 1} tokens"
        if not chunks or chunks[-1].get("generated_text") is None:
            return None, f"no final event after {len(chunks)} tokens"
        return chunks[-1]["generated_text"], None
    if not events or events[-1] != "[DONE]":
        return None, f"no [DONE] after {len(events)} events"
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return None, "error event"
    if call.api == "chat_stream":
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]), None
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"]), None


class Load:
    """What a fault sees of the load under way: `started` is set once a stream has its first event, `streaming`
    counts by replica the streams that have had their first event and not their end (a stream whose whole rest came
    in one read ends before a fault can see it), `done` lists the outcomes so far, and setting `stop` sends no more
    requests."""

    def __init__(self) -> None:
        self.started, self.stop = asyncio.Event(), asyncio.Event()
        self.streaming: collections.Counter[str | None] = collections.Counter()
        self.done: list[Outcome] = []

    async def answered(self, count: int, timeout: float = 60) -> None:
        """Until `count` more requests have been answered."""
        target = len(self.done) + count
        deadline = time.monotonic() + timeout
        while len(self.done) < target and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


def run_load(fleet: Fleet, work: list[Call], fault=None, concurrency: int = 6, pace: float = 0.0) -> list[Outcome]:
    """Sends `work` through the balancer, `concurrency` at a time, the i-th not before i * pace seconds, until it
    is all sent or the fault stops it; fault(load), if given, runs meanwhile."""

    async def main():
        load, gate = Load(), asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=fleet.url, timeout=60) as client:

            async def one(i: int, call: Call) -> Outcome | None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(load.stop.wait(), i * pace)
                async with gate:
                    if load.stop.is_set():
                        return None
                    outcome = await _send(client, call, load)
                    load.done.append(outcome)
                    return outcome

            tasks = [asyncio.create_task(one(i, call)) for i, call in enumerate(work)]
            if fault is not None:
                await fault(load)
            return [o for o in await asyncio.gather(*tasks) if o is not None]

    return asyncio.run(main())


def report(name: str, outcomes: list[Outcome]) -> dict:
    """What the load cost its clients; printed for README's table."""
    failed = [o for o in outcomes if o.text is None]
    summary = {
        "scenario": name,
        "requests": len(outcomes),
        "answered": len(outcomes) - len(failed),
        "failed": [o.failure for o in failed],
        "max_seconds": round(max(o.seconds for o in outcomes), 2),
        "replicas": sorted({o.replica for o in outcomes if o.replica}),
    }
    print(json.dumps(summary))
    return summary


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed: `apt-get install haproxy` (.ci/run and make test install it)")
    fleet = Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        for n in (2, 3):
            fleet.start(n)
        for replica in fleet.replicas.values():
            replica.ready()
        fleet.wait_serving({"127.0.0.2", "127.0.0.3"})
        yield fleet
    finally:
        fleet.close()


def test_scale_up_from_two_to_three_while_serving(fleet):
    """A replica started while requests keep coming (without the pirate adapter: see the next test) is found through
    DNS and health-checked into service, without a reload; no request is lost."""
    added = {}

    async def scale_up(load):
        await load.started.wait()
        added["at"] = time.monotonic()
        replica = fleet.start(4, store=fleet.store_without_pirate)
        await asyncio.to_thread(replica.ready)
        await asyncio.to_thread(fleet.wait_serving, {"127.0.0.2", "127.0.0.3", "127.0.0.4"})
        added["serving_after"] = time.monotonic() - added["at"]
        await load.answered(12)
        load.stop.set()

    outcomes = run_load(fleet, calls(200), scale_up, concurrency=3, pace=0.2)
    summary = report("scale-up 2 -> 3", outcomes)
    print(f"the new replica served {added['serving_after']:.1f} s after it started")
    assert summary["failed"] == []
    fleet.check(outcomes)
    assert "r4" in summary["replicas"]


def test_metrics_and_the_operator_view_are_not_served_through_the_balancer(fleet):
    """Percent-encoded paths included: uvicorn decodes /%6detrics to /metrics."""
    for path in ("/metrics", "/%6detrics", "/operator", "/%6Fperator", "/%6f%70erator"):
        response = httpx.get(f"{fleet.url}{path}", timeout=10)
        assert response.status_code == 404 and response.json()["error_type"] == "http", (path, response.text[:80])
    assert httpx.get(f"{fleet.replicas['127.0.0.2'].url}/%6detrics", timeout=10).status_code == 200  # as the replica


def _not_found(replica: Replica) -> float:
    """How many 404s the replica has answered."""
    text = httpx.get(f"{replica.url}/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("mixserve:requests_total{")]
    return sum(float(line.split()[-1]) for line in lines if 'status="404"' in line)


def test_a_replica_missing_an_adapter_gets_its_requests_retried_elsewhere(fleet):
    """r4's store lacks pirate: its 404 (adapter_not_found) is retried on another replica, which has it."""
    lacking = fleet.replicas["127.0.0.4"]
    before = _not_found(lacking)
    outcomes = run_load(fleet, calls(24, combos=["pirate", "pirate+british", "digits"]))
    summary = report("missing adapter", outcomes)
    for private in ("/metrics", "/operator"):  # read from each replica, not through the balancer
        response = httpx.get(f"{fleet.url}{private}", timeout=10)
        assert response.status_code == 404 and response.json() == {"error": "Not Found", "error_type": "http"}
    assert summary["failed"] == []
    fleet.check(outcomes)
    assert _not_found(lacking) > before  # it was asked, and said so
    assert all(o.replica != "r4" for o in outcomes if "pirate" in o.call.combo)


def test_sigterm_drains_without_losing_a_request(fleet):
    """The replica's /ready turns 404 and the balancer sends it nothing new (NOLB) without cutting what it has: a
    long stream it had started when signalled finishes with its final event, new requests go elsewhere (a 503 it
    sends meanwhile is retried), and it exits 0."""
    victim, times, long = fleet.replicas["127.0.0.3"], {}, {}
    key = _key_on(fleet, "r3")

    async def long_stream(started: asyncio.Event):
        body = {"inputs": "long", "adapters": key.split("+"), "parameters": {"max_new_tokens": 400}}
        body["parameters"]["ignore_eos_token"] = True
        async with (
            httpx.AsyncClient(base_url=fleet.url, timeout=120) as client,
            client.stream("POST", "/generate_stream", json=body, headers={"X-Adapters": key}) as response,
        ):
            long["replica"] = response.headers.get("x-replica")
            long["events"] = []
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    long["events"].append(json.loads(line[5:]))
                    started.set()

    async def drain(load):
        await load.started.wait()
        await load.answered(3)
        started = asyncio.Event()
        streaming = asyncio.create_task(long_stream(started))
        await started.wait()
        signalled = time.monotonic()
        victim.process.send_signal(signal.SIGTERM)
        times["long_at_signal"] = len(long["events"])
        await asyncio.to_thread(wait_until, lambda: "127.0.0.3" not in fleet.up(either=True), 30, "r3 out")
        times["out"] = time.monotonic() - signalled
        times["exit"] = await asyncio.to_thread(victim.process.wait, 60)
        times["exited"] = time.monotonic() - signalled
        await streaming
        await load.answered(6)
        load.stop.set()

    outcomes = run_load(fleet, calls(200), drain, concurrency=4, pace=0.1)
    fleet.forget(victim)
    summary = report("SIGTERM", outcomes)
    print(f"out of the balancer {times['out']:.1f} s after SIGTERM; exit {times['exit']} after {times['exited']:.1f} s")
    print(f"the long stream on r3: {times['long_at_signal']} of 400 tokens at SIGTERM, {len(long['events'])} in all")
    assert summary["failed"] == [] and times["exit"] == 0
    assert long["replica"] == "r3" and times["long_at_signal"] < 400
    assert len(long["events"]) == 400 and long["events"][-1]["generated_text"] is not None  # its final event
    fleet.check(outcomes)


def test_a_replica_restarted_on_a_new_address_rejoins(fleet):
    """r3 comes back on 127.0.0.5 (a new container's address): DNS has it, the balancer health-checks it in."""
    times = {}

    async def restart(load):
        await load.started.wait()
        started = time.monotonic()
        replica = fleet.start(5, name="r3-restarted")
        await asyncio.to_thread(replica.ready)
        await asyncio.to_thread(fleet.wait_serving, {"127.0.0.2", "127.0.0.4", "127.0.0.5"})
        times["serving"] = time.monotonic() - started
        await load.answered(12)
        load.stop.set()

    outcomes = run_load(fleet, calls(200), restart, concurrency=3, pace=0.2)
    summary = report("restart on a new address", outcomes)
    print(f"serving {times['serving']:.1f} s after its start")
    assert summary["failed"] == []
    fleet.check(outcomes)
    assert "r3-restarted" in summary["replicas"]


def _only_started_streams_lost(outcomes: list[Outcome]) -> None:
    """Every request without an answer is a stream that had started, and its client saw it fail."""
    for outcome in outcomes:
        if outcome.text is None:
            assert outcome.call.streamed and outcome.events >= 1 and outcome.failure, outcome


def _key_on(fleet: Fleet, replica: str) -> str:
    """A combination (of adapters every replica has) whose X-Adapters the balancer hashes to `replica`."""
    names = ["digits", "uppercase", "british", "excited", "signoff"]
    for combo in [*names, *(f"{a}+{b}" for a in names for b in names if a < b)]:
        call = Call("generate", combo, "key", affinity=True, tokens=2)
        if asyncio.run(_send_once(fleet.url, call)).replica == replica:
            return combo
    raise AssertionError(f"no combination hashes to {replica}")


def test_a_stopped_replica_is_taken_out_and_its_keys_move_and_come_back(fleet):
    """SIGSTOP (a hung process: the kernel still accepts its connections) for STOP_SECONDS: its /ready checks time
    out and the balancer takes it out, retrying elsewhere what it had not answered (a stream it had started is cut);
    its affinity keys go to another replica meanwhile and back after SIGCONT."""
    victim, times = fleet.replicas["127.0.0.4"], {}
    key = _key_on(fleet, "r4")
    work = [c if i % 2 else Call("generate", key, f"q{i % 7}", affinity=True) for i, c in enumerate(calls(400))]

    async def stop(load):
        await load.answered(4)
        stopped = time.monotonic()
        victim.process.send_signal(signal.SIGSTOP)
        await asyncio.to_thread(wait_until, lambda: "127.0.0.4" not in fleet.up(either=True), 30, "r4 out")
        times["out"] = time.monotonic() - stopped
        await asyncio.sleep(STOP_SECONDS - (time.monotonic() - stopped))
        victim.process.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        await asyncio.to_thread(wait_until, lambda: "127.0.0.4" in fleet.up(), 30, "r4 back")
        times["back"] = time.monotonic() - resumed
        await load.answered(6)
        load.stop.set()

    outcomes = run_load(fleet, work, stop, concurrency=3, pace=0.1)
    summary = report(f"SIGSTOP {STOP_SECONDS} s", outcomes)
    print(f"out {times['out']:.1f} s after SIGSTOP, back {times['back']:.1f} s after SIGCONT")
    keyed = [o.replica for o in outcomes if o.call.combo == key and o.call.affinity]
    print("the key's replicas, in order:", keyed)
    fleet.check(outcomes)
    _only_started_streams_lost(outcomes)
    assert summary["max_seconds"] < 6  # nobody waited for the stopped replica to resume (the issue: ~5 s)
    assert {"r4"} < set(keyed)  # it moved
    answers = [asyncio.run(_send_once(fleet.url, work[0])) for _ in range(3)]
    assert [a.replica for a in answers] == ["r4"] * 3  # and came back


def test_sigkill_loses_only_streams_that_had_started_and_their_clients_see_it(fleet):
    """Killed while it streams: what it had not started answering (plain requests, streams before their first
    token) is retried on another replica; a stream cut after its first token fails visibly (no final event, no
    [DONE]: here the chunked body ends early)."""
    victim = fleet.replicas["127.0.0.5"]

    async def kill(load):
        deadline = time.monotonic() + 60
        while not load.streaming["r3-restarted"] and time.monotonic() < deadline:  # mid-stream, as its client sees it
            await asyncio.sleep(0.01)
        victim.process.send_signal(signal.SIGKILL)

    outcomes = run_load(fleet, calls(36, tokens=120), kill, concurrency=6)
    fleet.forget(victim)
    summary = report("SIGKILL", outcomes)
    fleet.check(outcomes)
    _only_started_streams_lost(outcomes)
    assert 1 <= len(summary["failed"]) < len(outcomes)  # it was killed mid-stream


def test_a_started_stream_quiet_for_longer_than_the_stream_timeout_is_not_cut(tmp_path, serve, llama, monkeypatch):
    """The balancer's stream timeout (here 3 s) is an inactivity timeout: an engine that pauses 6 s once a stream has
    started (a preemption, a long prefill) would get it cut but for the keep-alive comments the replica sends."""
    monkeypatch.setattr(serving, "KEEP_ALIVE_SECONDS", 0.5)
    server = serve(llama.settings())
    engine, step, paused = server.state.engine, server.state.engine.step, []

    def pausing_step():
        if not paused and any(seq.first_token_at for seq in engine.runner.rows):  # its first token went out
            paused.append(time.monotonic())
            time.sleep(6)
        return step()

    monkeypatch.setattr(engine, "step", pausing_step)
    fleet = Fleet(tmp_path, port=int(server.url.rsplit(":", 1)[1]), stream_timeout="3s")
    try:
        fleet.dns.addresses.append("127.0.0.1")
        fleet.wait_serving({"127.0.0.1"})
        body = {"inputs": "x", "parameters": {"max_new_tokens": 200, "ignore_eos_token": True}}
        with httpx.stream("POST", f"{fleet.url}/generate_stream", json=body, timeout=60) as response:
            lines = list(response.iter_lines())
        events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
        assert paused and len(events) == 200 and events[-1]["generated_text"] is not None, lines[-3:]
        assert lines.count(": keep-alive") >= 3
    finally:
        monkeypatch.undo()
        fleet.close()
