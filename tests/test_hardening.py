"""Hardening: API keys and tenant isolation, request limits and deadlines, faults that must stay with one request."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from server.adapters import loader as loader_module
from server.adapters.build import BuiltAdapter
from server.adapters.mixing import RankPool
from server.auth import OPEN_PATHS, Keyring, Unauthorized
from server.errors import AdapterOutOfMemory, Overloaded
from tests.conftest import DEVICE

ADMIN, ACME, GLOBEX = "admin-key-0001", "acme-key-0001", "globex-key-001"
KEYS = f"{ADMIN},{ACME}:acme/,{GLOBEX}:globex/"
PROMPT = "Faults stay where they start"


@pytest.fixture(scope="module")
def tenant_store(llama, tmp_path_factory) -> Path:
    """Adapters at the top (admin only) and in two tenants' namespaces, one nested a level deeper."""
    root = tmp_path_factory.mktemp("tenants")
    layout = {"lora": "lora", "acme/lora": "lora", "acme/team/oft": "oft", "globex/loha": "loha"}
    for name, source in layout.items():
        shutil.copytree(llama.store / source, root / name)
    return root


@pytest.fixture(scope="module")
def guarded(serve, llama, tenant_store):
    return serve(llama.settings(adapters_dir=tenant_store, api_keys=KEYS, max_body_bytes=20_000))


def call(server, method: str, path: str, key: str | None = None, headers=None, **kwargs) -> httpx.Response:
    headers = {**(headers or {}), **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.request(method, server.url + path, headers=headers, timeout=120, **kwargs)


def generate(server, adapters, key=None, tokens=4, **parameters) -> httpx.Response:
    body = {"inputs": PROMPT, "adapters": adapters, "parameters": {"max_new_tokens": tokens, **parameters}}
    return call(server, "POST", "/generate", key, json=body)


# --- authentication


def _routes(server) -> list[tuple[str, str]]:
    """Every (method, path) the app serves: its OpenAPI operations and the documentation pages."""
    found = [("GET", path) for path in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")]
    for path, operations in server.app.openapi()["paths"].items():
        found += [(method.upper(), path.replace("{name}", "acme/lora")) for method in operations]
    return found


def test_every_route_but_the_probes_needs_a_valid_key(guarded):
    routes = _routes(guarded)
    assert len(routes) > 15
    for method, path in routes:
        if path in OPEN_PATHS:
            assert call(guarded, method, path).status_code == 200, path
            continue
        for key in (None, "wrong-key-0001", ADMIN[:-1], ADMIN + "x"):
            response = call(guarded, method, path, key, json={})
            assert response.status_code == 401, (method, path, key, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            error = response.json()["error"]
            assert "API key" in (error["message"] if path.startswith("/v1/") else error)
        assert call(guarded, method, path, ADMIN, json={}).status_code != 401, (method, path)
    other_scheme = httpx.get(f"{guarded.url}/info", headers={"Authorization": f"Basic {ADMIN}"})
    assert other_scheme.status_code == 401


def test_a_tenant_uses_and_sees_only_its_namespace(guarded):
    assert generate(guarded, ["acme/lora", "acme/team/oft"], ACME).status_code == 200
    unknown = generate(guarded, ["acme/nothing"], ACME)
    assert unknown.status_code == 404
    for foreign in (["globex/loha"], ["lora"], ["acme/lora", "globex/loha"]):
        response = generate(guarded, foreign, ACME)
        assert response.status_code == 404, foreign
        # worded as for an adapter that does not exist: nothing tells that it does
        name = next(n for n in foreign if not n.startswith("acme/"))
        assert response.json() == {**unknown.json(), "error": unknown.json()["error"].replace("acme/nothing", name)}

    listed = [a["name"] for a in call(guarded, "GET", "/adapters?all=true", ACME).json()["adapters"]]
    assert listed == ["acme/lora", "acme/team/oft"]
    models = [m["id"] for m in call(guarded, "GET", "/v1/models", ACME).json()["data"] if m["parent"]]
    assert models == ["acme/lora", "acme/team/oft"]
    assert call(guarded, "GET", "/info", ACME).json()["adapters_available"] == 2
    assert call(guarded, "POST", "/adapters/globex/loha/load", ACME).status_code == 404
    assert call(guarded, "POST", "/adapters/acme/team/oft/load", ACME).json()["state"] == "loaded"
    assert call(guarded, "DELETE", "/adapters/globex/loha", ACME).status_code == 404
    completion = {"model": "globex/loha", "prompt": PROMPT, "max_tokens": 2}
    assert call(guarded, "POST", "/v1/completions", ACME, json=completion).status_code == 404
    chat = {
        "model": guarded.state.settings.model_id,
        "adapters": ["lora"],
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert call(guarded, "POST", "/v1/chat/completions", ACME, json=chat).status_code == 404

    assert generate(guarded, ["globex/loha"], GLOBEX).status_code == 200
    everything = [a["name"] for a in call(guarded, "GET", "/adapters?all=true", ADMIN).json()["adapters"]]
    assert everything == ["acme/lora", "acme/team/oft", "globex/loha", "lora"]
    assert generate(guarded, ["lora", "globex/loha"], ADMIN).status_code == 200


def test_loaded_adapters_of_one_tenant_are_not_listed_to_another(guarded):
    assert generate(guarded, ["globex/loha"], GLOBEX).status_code == 200
    loaded = [a["name"] for a in call(guarded, "GET", "/adapters", ACME).json()["adapters"]]
    assert loaded and all(name.startswith("acme/") for name in loaded)


def test_a_presented_key_is_compared_with_every_key_without_an_early_exit(monkeypatch):
    """The property that makes the check's time independent of which key, or how much of one, matched: the
    presented key's digest is compared, by hmac.compare_digest, with every stored digest (all of one length), in
    full, whether it matches the first key, the last, or none."""
    keys = [f"{i:02d}" + "k" * 38 for i in range(8)]
    ring = Keyring.parse(",".join(keys))
    stored = [hashlib.sha256(key.encode()).digest() for key in keys]
    compared: list[bytes] = []
    real = hmac.compare_digest

    def compare_digest(a, b):
        compared.append(a)
        assert len(a) == len(b) == 32
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", compare_digest)
    for presented in (keys[0], keys[-1], keys[0][:-1] + "x", "z" * 40, "short"):
        compared.clear()
        try:
            ring.tenant(f"Bearer {presented}")
        except Unauthorized:
            assert presented not in keys
        assert compared == stored, presented


def test_keys_are_validated_at_start(llama, tmp_path):
    with pytest.raises(ValueError, match="at least 8 characters"):
        llama.settings(api_keys="short")
    with pytest.raises(ValueError, match="empty adapter prefix"):
        llama.settings(api_keys="long-enough-key:/")
    keys = tmp_path / "keys"
    keys.write_text("# tenants\nfile-key-0001:acme/\n\nfile-key-0002\n")
    ring = Keyring.from_settings("", llama.settings(api_keys_file=keys).api_keys_file)
    assert ring.tenant("Bearer file-key-0001").prefixes == ("acme/",)
    assert ring.tenant("Bearer file-key-0002").prefixes is None


# --- limits


def test_body_over_the_limit_is_413_declared_or_streamed(guarded):
    big = {"inputs": "x" * 30_000, "parameters": {"max_new_tokens": 1}}
    response = call(guarded, "POST", "/generate", ADMIN, json=big)
    assert response.status_code == 413
    assert response.json()["error_type"] == "payload_too_large"

    def chunks():
        for _ in range(30):
            yield b"x" * 1000

    streamed = call(guarded, "POST", "/v1/completions", ADMIN, content=chunks())
    assert streamed.status_code == 413
    assert "MIXSERVE_MAX_BODY_BYTES" in streamed.json()["error"]["message"]
    pieces = iter([b'{"inputs": "hi", ', b'"parameters": {}}'])
    small = call(guarded, "POST", "/generate", ADMIN, content=pieces, headers={"content-type": "application/json"})
    assert small.status_code == 200, small.text


@pytest.mark.parametrize(
    ("parameters", "reason"),
    [
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ["x" * 257]}, "longer than 256 characters"),
        ({"max_new_tokens": 10**6}, "max_new_tokens"),
    ],
)
def test_request_limits_are_clear_422s(guarded, parameters, reason):
    response = generate(guarded, [], ADMIN, **parameters)
    assert response.status_code == 422
    assert reason in response.json()["error"]


@pytest.fixture(scope="module")
def slow(serve, llama):
    """A server whose every forward pass takes at least 20 ms, with a 0.5 s request deadline."""
    server = serve(llama.settings(request_timeout=0.5))
    model = server.state.engine.model
    original = model.forward

    def forward(*args, **kwargs):
        time.sleep(0.02)
        return original(*args, **kwargs)

    model.forward = forward
    yield server
    model.forward = original


def test_a_request_past_its_deadline_gets_408_and_frees_its_row(slow):
    started = time.monotonic()
    response = generate(slow, [], tokens=200, ignore_eos_token=True)
    assert response.status_code == 408
    assert response.json()["error_type"] == "timeout"
    assert 0.5 < time.monotonic() - started < 5
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 200, "ignore_eos_token": True}}
    with httpx.stream("POST", f"{slow.url}/generate_stream", json=body, timeout=60) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data:")]
    assert '"error_type": "timeout"' in events[-1]
    assert 0 < len(events) < 200
    deadline = time.monotonic() + 5
    while slow.state.engine.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow.state.engine.running == 0
    assert generate(slow, [], tokens=3).status_code == 200


# --- faults stay with their request


@pytest.fixture()
def plain(serve, llama):
    return serve(llama.settings())


def _crowd(server, bodies: list[dict], path: str = "/generate") -> list[httpx.Response]:
    results: list[httpx.Response | None] = [None] * len(bodies)

    def send(i):
        results[i] = httpx.post(server.url + path, json=bodies[i], timeout=120)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def _inject(server, poison: int):
    """The model raises on any pass whose input holds the token `poison`."""
    model = server.state.engine.model
    original = model.forward

    def forward(*args, input_ids=None, **kwargs):
        if input_ids is not None and bool((input_ids == poison).any()):
            raise RuntimeError("injected fault")
        return original(*args, input_ids=input_ids, **kwargs)

    model.forward = forward
    return lambda: setattr(model, "forward", original)


def test_a_fault_in_one_row_fails_only_that_request(plain):
    combos = [[], ["lora"], ["loha", "oft"], ["lokr", "shira", "adalora"]]
    bodies = [
        {"inputs": f"{PROMPT} {i}", "adapters": combo, "parameters": {"max_new_tokens": 12, "ignore_eos_token": True}}
        for i, combo in enumerate(combos)
    ]
    alone = [generate_json(plain, body) for body in bodies]
    tokenizer = plain.state.tokenizer
    seen = set(tokenizer.encode(" ".join([PROMPT + " 0123", *alone])))
    poison = next(t for t in range(3, 259) if t not in seen)
    restore = _inject(plain, poison)
    try:
        poisoned_prompt = {"inputs": PROMPT + tokenizer.decode([poison]), "parameters": {"max_new_tokens": 5}}
        forced = {
            "model": "lora",
            "prompt": PROMPT,
            "max_tokens": 12,
            "temperature": 0,
            "logit_bias": {str(poison): 100},
        }
        for _ in range(2):  # the poisoned request arrives alone or with others, in prefill or in decode
            crowd = _crowd(plain, [*bodies, poisoned_prompt])
            assert crowd[-1].status_code == 500
            assert "internal error computing this request" in crowd[-1].json()["error"]
            assert [r.json()["generated_text"] for r in crowd[:-1]] == alone
            results: list = [None, None]
            threads = [
                threading.Thread(target=lambda: results.__setitem__(0, _crowd(plain, bodies))),
                threading.Thread(target=lambda: results.__setitem__(1, _crowd(plain, [forced], "/v1/completions"))),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert results[1][0].status_code == 500
            assert [r.json()["generated_text"] for r in results[0]] == alone
    finally:
        restore()
    assert [generate_json(plain, body) for body in bodies] == alone


def test_a_sampling_fault_fails_only_its_request(plain, monkeypatch):
    from server.engine.sampling import TokenChooser

    original = TokenChooser.noise

    def noise(self, vocab):
        if self.seed == 13:
            raise ValueError("injected sampling fault")
        return original(self, vocab)

    monkeypatch.setattr(TokenChooser, "noise", noise)
    sampled = {"do_sample": True, "max_new_tokens": 8, "ignore_eos_token": True}
    bodies = [{"inputs": PROMPT, "parameters": {**sampled, "seed": seed}} for seed in (11, 12, 13, 14)]
    responses = _crowd(plain, bodies)
    assert [r.status_code for r in responses] == [200, 200, 500, 200]


def generate_json(server, body) -> str:
    response = httpx.post(server.url + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["generated_text"]


def test_out_of_memory_on_attach_evicts_idle_adapters_and_retries_once(plain, monkeypatch):
    registry = plain.state.registry
    for name in ("lora", "oft"):
        assert generate(plain, [name]).status_code == 200
    original, failures = BuiltAdapter.to, {"left": 1}

    def to(self, device):
        if failures["left"]:
            failures["left"] -= 1
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return original(self, device)

    monkeypatch.setattr(BuiltAdapter, "to", to)
    assert generate(plain, ["loha"]).status_code == 200
    resident = {a.name for a in registry.loaded()}
    assert "loha" in resident and not {"lora", "oft"} & resident  # evicted to make room

    failures["left"] = 2
    response = generate(plain, ["lokr"])
    assert response.status_code == 503
    assert response.json()["error_type"] == AdapterOutOfMemory.error_type
    assert "lokr" not in {a.name for a in registry.loaded()}  # nothing attached
    assert generate(plain, ["lokr"]).status_code == 200  # memory back: served


def test_an_adapter_deleted_during_traffic_fails_only_new_requests_for_it(serve, llama, tmp_path):
    store = tmp_path / "store"
    for name in ("lora", "oft"):
        shutil.copytree(llama.store / name, store / name)
    server = serve(llama.settings(adapters_dir=store))
    body = {"inputs": PROMPT, "adapters": ["lora"], "parameters": {"max_new_tokens": 200, "ignore_eos_token": True}}
    outcome: dict = {}
    thread = threading.Thread(
        target=lambda: outcome.update(r=httpx.post(f"{server.url}/generate", json=body, timeout=60))
    )
    thread.start()
    deadline = time.monotonic() + 30
    while not server.state.engine.running and time.monotonic() < deadline:
        time.sleep(0.005)
    shutil.rmtree(store / "lora")
    thread.join(60)
    assert outcome["r"].status_code == 200
    assert generate(server, ["lora"]).status_code == 404
    assert generate(server, ["oft"]).status_code == 200


# --- what a client is told: its own outcome, never another request's data or a server path


def test_metrics_need_a_key_without_namespaces(guarded):
    assert generate(guarded, ["globex/loha"], GLOBEX).status_code == 200
    assert call(guarded, "GET", "/metrics").status_code == 401
    scoped = call(guarded, "GET", "/metrics", ACME)
    assert scoped.status_code == 403 and scoped.json()["error_type"] == "forbidden"
    assert "globex" not in scoped.text and "lora_requests_info" not in scoped.text
    admin = call(guarded, "GET", "/metrics", ADMIN)
    assert admin.status_code == 200 and "mixserve:lora_requests_info" in admin.text


def test_expected_refusals_are_logged_at_info_not_error(guarded, caplog):
    caplog.set_level(logging.INFO)
    assert call(guarded, "GET", "/info").status_code == 401
    assert generate(guarded, ["acme/nothing"], ACME).status_code == 404
    assert generate(guarded, [], ADMIN, max_new_tokens=10**6).status_code == 422
    guarded.app.state.traffic.draining = True
    try:
        assert call(guarded, "GET", "/ready").status_code == 404  # draining (tests/test_deploy.py)
        assert generate(guarded, [], ADMIN).status_code == 503  # turned away before any route: not logged
    finally:
        guarded.app.state.traffic.draining = False
    ours = [r for r in caplog.records if r.name.startswith("server")]
    assert any("/ready -> 404" in r.getMessage() and r.levelno == logging.INFO for r in ours)
    for status in (401, 404, 422):
        assert any(f"-> {status}" in r.getMessage() and r.levelno == logging.INFO for r in ours), status
    assert [r.getMessage() for r in ours if r.levelno >= logging.ERROR] == []


def _submit(server, prompt: str, adapters: list[str], tokens: int = 4, request_id: str = "r", **params):
    from server.adapters.combination import Combination
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import GenerationRequest
    from server.model import encode_prompt

    ids = encode_prompt(server.state.tokenizer, prompt)
    sampling = SamplingParams(max_new_tokens=tokens, ignore_eos=True, **params)
    return server.state.engine.submit(GenerationRequest(request_id, ids, Combination(tuple(adapters)), sampling))


async def _outcome(handle, timeout: float = 60):
    """The sequence, or the error it failed with (a test that would hang fails instead)."""
    from server.errors import MixserveError

    try:
        return await asyncio.wait_for(handle.result(), timeout)
    except MixserveError as exc:
        return exc


def _assert_nothing_held(server) -> None:
    engine, registry = server.state.engine, server.state.registry
    assert engine.queued == 0 and not engine.scheduler.waiting and engine.running == 0
    assert [a.name for a in registry.loaded() if a.refs] == []


SECRET = "/srv/tenants/globex/private-adapter/adapter_model.safetensors"


def test_an_unexpected_error_preparing_adapters_stays_with_its_request(plain, caplog):
    """Requests admitted in the same step keep their rows, the running one keeps decoding; the one whose adapters
    raised gets a generic 500 (the details, a path, only in the log with its id), once: the engine does not spin."""
    assert generate(plain, ["loha"]).status_code == 200  # resident: admitted at once, before the faulty one
    store = plain.state.store
    original = store.signature

    def signature(name):
        if name == "oft":
            raise OSError(f"[Errno 2] No such file or directory: {SECRET!r}")
        return original(name)

    store.signature = signature

    async def run():
        running = _submit(plain, PROMPT, ["lora"], tokens=60, request_id="running")
        await anext(running.stream())
        handles = [
            _submit(plain, PROMPT, ["loha"], request_id="before"),
            _submit(plain, PROMPT, ["oft"], request_id="faulty"),
            _submit(plain, PROMPT, [], request_id="after"),
        ]
        return [await _outcome(h) for h in [running, *handles]]

    try:
        running, before, faulty, after = asyncio.run(run())
    finally:
        del store.signature
    assert len(running.tokens) == 60 and len(before.tokens) == 4 and len(after.tokens) == 4
    assert faulty.status_code == 500 and "/" not in faulty.message and "Errno" not in faulty.message
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR and "faulty" in r.getMessage()]
    assert len(logged) == 1 and SECRET in caplog.text
    _assert_nothing_held(plain)


def test_a_fault_scoring_one_prompt_fails_only_that_request(plain):
    """decoder_input_details scores the prompts in a pass of their own: a fault there fails that request alone (the
    pass fails for every row that holds the poisoned prompt, alone or in a batch)."""
    from server.model import encode_prompt

    runner = plain.state.engine.runner
    poisoned = "Poisoned prompt to score"
    poison = encode_prompt(plain.state.tokenizer, poisoned)
    original = runner.score

    def score(ids, *args):
        if any(row[: len(poison)].tolist() == poison for row in ids):
            raise RuntimeError(f"injected scoring fault reading {SECRET}")
        return original(ids, *args)

    runner.score = score

    async def run():
        running = _submit(plain, PROMPT, ["lora"], tokens=60, request_id="running")
        await anext(running.stream())
        handles = [
            _submit(plain, PROMPT, ["oft"], request_id="scored", prompt_logprobs=True),
            _submit(plain, poisoned, ["oft"], request_id="poisoned", prompt_logprobs=True),
        ]
        return [await _outcome(h) for h in [running, *handles]]

    try:
        running, scored, failed = asyncio.run(run())
    finally:
        del runner.score
    assert len(running.tokens) == 60
    assert len(scored.tokens) == 4 and len(scored.prompt_logprobs) == len(scored.request.prompt_ids)
    assert failed.status_code == 500 and "internal error computing this request" in failed.message
    assert SECRET not in failed.message and "injected" not in failed.message
    _assert_nothing_held(plain)


def test_loader_errors_name_no_server_path(serve, llama, tmp_path, monkeypatch):
    store = tmp_path / "store"
    for name in ("lora", "unreadable", "crashes"):
        shutil.copytree(llama.store / "lora", store / name)
    server = serve(llama.settings(adapters_dir=store))
    read_bytes, build = Path.read_bytes, loader_module.build_adapter

    def unreadable(path):
        if path.parent.name == "unreadable":
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    def crashes(files, *args):
        if files.name == "crashes":
            raise FileNotFoundError(2, "No such file or directory", str(store / "crashes" / "x"))
        return build(files, *args)

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    monkeypatch.setattr(loader_module, "build_adapter", crashes)
    for name, status in (("unreadable", 422), ("crashes", 424)):
        response = generate(server, [name])
        assert response.status_code == status, response.text
        assert str(tmp_path) not in response.text and name in response.json()["error"]
    listing = httpx.get(f"{server.url}/adapters", params={"all": "true"}).text
    assert str(tmp_path) not in listing and "Permission denied" in listing
    assert generate(server, ["lora"]).status_code == 200


def test_completions_for_several_prompts_stop_them_all_when_one_is_refused_or_fails(plain, monkeypatch):
    engine, submitted = plain.state.engine, []
    original, refuse = engine.submit, {"at": 1}

    def submit(gen):
        if len(submitted) == refuse["at"]:
            raise Overloaded("injected: the queue is full")
        submitted.append(original(gen))
        return submitted[-1]

    monkeypatch.setattr(engine, "submit", submit)
    tokenizer = plain.state.tokenizer
    body = {
        "model": "lora",
        "prompt": [PROMPT, PROMPT + " again"],
        "max_tokens": 200,
        "temperature": 0,
        "logit_bias": {str(tokenizer.eos_token_id): -100},  # neither can finish before the other's outcome
    }
    response = httpx.post(f"{plain.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 429
    assert submitted[0].seq.cancelled  # not left generating for nobody

    seen = set(tokenizer.encode(PROMPT))
    poison = next(t for t in range(3, 259) if t not in seen)
    submitted.clear()
    refuse["at"] = None
    restore = _inject(plain, poison)
    try:
        body["prompt"] = [PROMPT, PROMPT + tokenizer.decode([poison])]
        response = httpx.post(f"{plain.url}/v1/completions", json=body, timeout=120)
    finally:
        restore()
    assert response.status_code == 500
    assert submitted[0].seq.cancelled


def test_an_unexpected_error_midway_through_a_stream_ends_it_with_an_error_event(plain, monkeypatch):
    """Not a cut connection: the stream's last event says what happened, in the route's shape, and the server
    serves the next request."""
    import server.api.native as native

    def broken(*args, **kwargs):
        raise RuntimeError(f"injected fault reading {SECRET}")

    monkeypatch.setattr(native, "_token", broken)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
    with plain.client() as client:
        events = [line for line in client.post("/generate_stream", json=body).text.splitlines() if line]
    last = json.loads(events[-1].removeprefix("data:"))
    assert last["error_type"] == "internal" and last["error"] == "internal error: RuntimeError", events
    assert SECRET not in "".join(events)
    monkeypatch.undo()
    with plain.client() as client:
        assert client.post("/generate", json=body).status_code == 200


# --- models whose vocabulary outgrows their tokenizer


def test_ids_past_the_tokenizer_are_never_sampled(serve, tmp_path):
    """Checkpoints pad their embeddings past the tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens). Those ids
    have no text: they are never chosen, greedy or sampled, even when the model favours them."""
    from transformers import AutoModelForCausalLM, ByT5Tokenizer

    from server.config import Settings
    from server.demo import tiny

    tokenizer = ByT5Tokenizer()
    config = tiny.config(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=2)
    config.vocab_size = len(tokenizer) + 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # every padding id outscores every real one
        head = model.get_output_embeddings().weight
        head[: len(tokenizer)].mul_(0.01)
        head[len(tokenizer) :].mul_(50)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "store").mkdir()
    server = serve(Settings(model=str(tmp_path / "model"), adapters_dir=tmp_path / "store", device=DEVICE))
    constrained = {"grammar": {"type": "regex", "value": "[a-z]{3,8}"}}
    for parameters in ({}, {"do_sample": True, "seed": 3, "top_k": 5}, constrained):
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True, "top_n_tokens": 3, **parameters}}
        response = call(server, "POST", "/generate", json=body)
        assert response.status_code == 200, response.text
        details = response.json()["details"]
        tokens = [t["id"] for t in details["tokens"]] + [t["id"] for top in details["top_tokens"] for t in top]
        assert tokens and all(t < len(tokenizer) for t in tokens)
        # the model's own logprobs, over its whole vocabulary: the padding ids it favours hold nearly all the mass
        # (renormalised over the tokenizer's 384 near-equal logits, each would be about -6)
        assert all(t["logprob"] < -8 for t in details["tokens"])
        with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=120) as stream:
            events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
        assert "error" not in events[-1] and events[-1]["generated_text"] is not None
    completion = {
        "model": server.state.settings.model_id,
        "prompt": PROMPT,
        "max_tokens": 2,
    }
    for refused in ({"logit_bias": {str(len(tokenizer) + 1): 5}}, {"prompt": [65, len(tokenizer) + 1], "echo": True}):
        response = call(server, "POST", "/v1/completions", json={**completion, **refused})
        assert response.status_code == 422 and f"0..{len(tokenizer) - 1}" in response.json()["error"]["message"]


def test_the_ids_a_tokenizer_has_may_leave_gaps():
    """An EOS at id 300 after 258 tokens: sampleable, though past len(tokenizer)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from server.model import tokenizer_ids

    vocab = {"<pad>": 0, "<unk>": 1, **{chr(97 + i): i + 2 for i in range(20)}, "</s>": 300}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), eos_token="</s>", pad_token="<pad>"
    )
    assert len(tokenizer) == 23 and tokenizer_ids(tokenizer, {300}) == 301
    assert tokenizer_ids(tokenizer, {400}) == 401  # the model's EOS, whatever the tokenizer says


def test_out_of_memory_midway_through_attach_leaves_no_layer_holding_the_adapter(plain, monkeypatch):
    """A rank pool that cannot grow on the adapter's second layer: the first layer lets it go again, idle adapters are
    evicted and the attach tried once more (served, exact); failing twice, 503 and no layer holds any of it."""
    registry, layers = plain.state.registry, plain.state.registry.model
    body = {"inputs": PROMPT, "adapters": ["lora"], "parameters": {"max_new_tokens": 6, "ignore_eos_token": True}}
    expected = generate_json(plain, body)
    assert httpx.delete(f"{plain.url}/adapters/lora", timeout=60).status_code == 200
    assert generate(plain, ["oft"]).status_code == 200  # idle, to be evicted
    original, calls, failing = RankPool.add, [], {2}

    def add(self, *args, **kwargs):
        calls.append(None)
        if len(calls) in failing:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RankPool, "add", add)
    assert generate_json(plain, body) == expected
    assert {a.name for a in registry.loaded()} == {"lora"}  # oft evicted to make room

    assert httpx.delete(f"{plain.url}/adapters/lora", timeout=60).status_code == 200
    calls.clear()
    failing = {2, 4}  # the second pooled layer of both tries: each undoes the first
    response = generate(plain, ["lora"])
    assert response.status_code == 503 and response.json()["error_type"] == AdapterOutOfMemory.error_type
    slot = registry._entries["lora"].current.slot
    assert not [name for name, w in layers._wrappers.items() if slot in w.adapters]
    assert all(slot not in w.pool.spans for w in layers._wrappers.values() if hasattr(w, "pool"))
    failing = set()
    assert generate_json(plain, body) == expected
