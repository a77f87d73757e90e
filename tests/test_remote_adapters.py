"""Adapters from object storage: a real S3-compatible server (moto's server mode) on loopback, the real boto3 client.

First fetch, a disk hit after a restart, single-flight, a replaced object, each failure (missing, unreachable,
timeout, access denied, partial download, corrupt in transit, corrupt file), the disk budget, tenants, and that no
error or log line names a credential, the bucket or the endpoint."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from server.adapters.sources import AdapterSource, Mount, SourceError, SourceOptions, parse_mounts
from server.adapters.sources.disk import DiskTier
from server.adapters.sources.remote import RemoteAdapters
from server.adapters.store import AdapterStore
from server.errors import AdapterLoadFailed
from server.model import encode_prompt
from tests.reference import reference_greedy

PROMPT = "Adapters come and go"
BUCKET = "mixserve-internal-bucket"
ACCESS_KEY, SECRET_KEY = "AKIATHROWAWAYTEST001", "throwaway-secret-for-moto-only"
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 (a free port), throwaway credentials in the standard environment variables."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            env.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=url)
        client.create_bucket(Bucket=BUCKET)
        yield S3(url, client)
        server.stop()


class S3:
    def __init__(self, url: str, client):
        self.url, self.client = url, client

    def upload(self, folder: Path, prefix: str, files=FILES) -> None:
        for filename in files:
            self.client.put_object(Bucket=BUCKET, Key=f"{prefix}/{filename}", Body=(folder / filename).read_bytes())


def settings(llama, s3, tmp_path, endpoint=None, **overrides):
    values = {
        "adapter_sources": f"acme/=s3://{BUCKET}/tenants/acme/,globex/=s3://{BUCKET}/tenants/globex/",
        "s3_endpoint_url": endpoint or s3.url,
        "disk_cache_dir": tmp_path / "disk",
        "load_retry_seconds": 0.2,
        "fetch_timeout": 2,
    }
    return llama.settings(**{**values, **overrides})


def generate(server, adapters, tokens=6, **parameters) -> httpx.Response:
    body = {"inputs": PROMPT, "adapters": adapters, "parameters": {"max_new_tokens": tokens, **parameters}}
    return httpx.post(f"{server.url}/generate", json=body, timeout=120)


def expected(server, llama, names, tokens=6) -> str:
    ids = encode_prompt(server.state.tokenizer, PROMPT)
    out = reference_greedy(llama.model_dir, llama.store, names, ids, tokens)
    return server.state.tokenizer.decode(out, skip_special_tokens=True)


def gets(server, name: str) -> list[str]:
    """Object keys the server's boto3 client GETs from now on (the real client's own event hooks)."""
    keys: list[str] = []
    client = server.state.store.remote.mount(name).source.client()
    client.meta.events.register("before-call.s3.GetObject", lambda params, **_: keys.append(params["url_path"]))
    return keys


def metric(server, line: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    found = re.search(rf"^{re.escape(line)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def listed(server) -> dict[str, dict]:
    return {a["name"]: a for a in httpx.get(f"{server.url}/adapters", params={"all": "true"}).json()["adapters"]}


def test_first_fetch_serves_as_local_then_a_restart_reads_the_disk_tier(serve, llama, s3, tmp_path):
    s3.upload(llama.store / "lora", "tenants/acme/first")
    server = serve(settings(llama, s3, tmp_path))
    response = generate(server, ["acme/first"])
    assert response.status_code == 200, response.text
    assert response.json()["generated_text"] == expected(server, llama, ["lora"])
    assert metric(server, 'mixserve:adapter_fetches_total{outcome="success"}') == 1
    assert metric(server, "mixserve:adapter_fetch_bytes_total") > 0
    assert metric(server, 'mixserve:adapter_tier{tier="disk",what="adapters"}') == 1
    assert listed(server)["acme/first"]["state"] == "loaded"

    again = serve(settings(llama, s3, tmp_path))  # a restart: same disk tier, a new process state
    fetched = gets(again, "acme/first")
    assert again.state.store.tier("acme/first") == "disk"
    response = generate(again, ["acme/first"])
    assert response.status_code == 200 and response.json()["generated_text"] == expected(again, llama, ["lora"])
    assert fetched == [] and metric(again, 'mixserve:adapter_fetches_total{outcome="success"}') == 0


def test_with_its_source_away_a_restart_serves_the_version_on_disk(serve, llama, s3, tmp_path):
    s3.upload(llama.store / "oft", "tenants/acme/kept")
    assert generate(serve(settings(llama, s3, tmp_path)), ["acme/kept"]).status_code == 200
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        away = f"http://127.0.0.1:{closed.getsockname()[1]}"
    server = serve(settings(llama, s3, tmp_path, endpoint=away))
    response = generate(server, ["acme/kept"])
    assert response.status_code == 200 and response.json()["generated_text"] == expected(server, llama, ["oft"])


def test_an_object_deleted_at_the_source_is_404_after_the_next_check(serve, llama, s3, tmp_path):
    s3.upload(llama.store / "lora", "tenants/acme/deleted")
    server = serve(settings(llama, s3, tmp_path, remote_check_seconds=0.3))
    assert generate(server, ["acme/deleted"]).status_code == 200
    for filename in FILES:
        s3.client.delete_object(Bucket=BUCKET, Key=f"tenants/acme/deleted/{filename}")
    deadline = time.monotonic() + 30
    while (response := generate(server, ["acme/deleted"])).status_code == 200:
        assert time.monotonic() < deadline, "the deletion was not noticed"
        time.sleep(0.2)
    assert response.status_code == 404 and response.json()["error_type"] == "adapter_not_found"


def test_sixteen_concurrent_requests_fetch_once(serve, llama, s3, tmp_path):
    s3.upload(llama.store / "loha", "tenants/acme/burst")
    server = serve(settings(llama, s3, tmp_path))
    fetched = gets(server, "acme/burst")

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            body = {"inputs": PROMPT, "adapters": ["acme/burst"], "parameters": {"max_new_tokens": 4}}
            return await asyncio.gather(*(client.post("/generate", json=body) for _ in range(16)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 16
    assert len({r.json()["generated_text"] for r in responses}) == 1
    assert sorted(fetched) == sorted(f"/tenants/acme/burst/{f}" for f in FILES)
    assert metric(server, 'mixserve:adapter_fetches_total{outcome="success"}') == 1


def test_a_replaced_object_is_picked_up_and_running_requests_finish_on_the_old(serve, llama, s3, tmp_path):
    s3.upload(llama.store / "lora", "tenants/acme/swap")
    server = serve(settings(llama, s3, tmp_path, remote_check_seconds=0.3))
    body = {"inputs": PROMPT, "adapters": ["acme/swap"], "parameters": {"max_new_tokens": 60, "ignore_eos_token": True}}
    events, first = [], threading.Event()

    def stream():
        with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(line)
                    first.set()

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    assert first.wait(60)
    s3.upload(llama.store / "lora.patterns", "tenants/acme/swap")
    new = expected(server, llama, ["lora.patterns"])
    deadline = time.monotonic() + 30
    while generate(server, ["acme/swap"]).json()["generated_text"] != new:
        assert time.monotonic() < deadline, "the new version was not picked up"
        time.sleep(0.2)
    thread.join(120)
    old = httpx.post(f"{server.url}/generate", json={**body, "adapters": ["lora"]}, timeout=120).json()
    assert json.loads(events[-1][5:])["generated_text"] == old["generated_text"]


def test_a_missing_adapter_is_404_and_a_corrupt_file_424(serve, llama, s3, tmp_path):
    server = serve(settings(llama, s3, tmp_path))
    response = generate(server, ["acme/nowhere"])
    assert response.status_code == 404 and response.json()["error_type"] == "adapter_not_found"
    s3.client.put_object(
        Bucket=BUCKET,
        Key="tenants/acme/garbage/adapter_config.json",
        Body=(llama.store / "lora" / FILES[0]).read_bytes(),
    )
    s3.client.put_object(Bucket=BUCKET, Key="tenants/acme/garbage/adapter_model.safetensors", Body=os.urandom(4096))
    response = generate(server, ["acme/garbage"])
    assert response.status_code == 424 and response.json()["error_type"] == "adapter_load", response.text
    assert generate(server, ["lora"]).status_code == 200  # others unaffected


class Proxy:
    """A TCP proxy on loopback in front of the S3 server that can misbehave: pass, truncate or flip a byte of
    large responses (over 1 kB: the weights), or hang (accept and never answer)."""

    def __init__(self, target: str):
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self._mode = "pass"
        self._open: set[socket.socket] = set()  # client connections, closed when the mode changes
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        """Connections kept alive by the client would keep the old mode: they are closed (it reconnects)."""
        self._mode = mode
        for client in list(self._open):
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self):
        while True:
            client, _ = self.sock.accept()
            self._open.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket):
        if self.mode == "hang":
            time.sleep(30)
            client.close()
            return
        upstream = socket.create_connection(self.target)
        methods: collections.deque[bytes] = collections.deque()
        threading.Thread(target=self._pipe, args=(client, upstream, methods), daemon=True).start()
        mode, data, cut = self.mode, b"", False
        while not cut:
            try:
                chunk = upstream.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            if mode == "pass":
                client.sendall(chunk)
                continue
            data += chunk
            while b"\r\n\r\n" in data and not cut:  # one whole response at a time
                head, _, body = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: (\d+)", head)
                size = int(length.group(1)) if length and methods and methods[0] != b"HEAD" else 0
                if len(body) < size:
                    break  # more to come
                methods and methods.popleft()
                if size > 1024 and head.startswith(b"HTTP/1.1 200"):
                    cut = mode == "truncate"
                    if cut:
                        body, size = body[: size // 2], size // 2
                    else:
                        body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
                client.sendall(head + b"\r\n\r\n" + body[:size])
                data = body[size:]
        for sock in (client, upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._open.discard(client)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, methods: collections.deque):
        """Client to server, noting each request's method (a HEAD's answer has a length but no body)."""
        try:
            while chunk := source.recv(65536):
                method = re.match(rb"^(GET|HEAD|PUT|POST|DELETE) ", chunk)
                if method:
                    methods.append(method.group(1))
                sink.sendall(chunk)
        except OSError:
            pass


@pytest.fixture(scope="module")
def proxied(serve, llama, s3, tmp_path_factory):
    proxy = Proxy(s3.url)
    tmp = tmp_path_factory.mktemp("proxied")
    return proxy, serve(settings(llama, s3, tmp, endpoint=proxy.url, fetch_timeout=0.5))


@pytest.mark.parametrize("mode, reason", [("truncate", "incomplete"), ("flip", "corrupt"), ("hang", "timeout")])
def test_a_failed_fetch_is_424_leaves_nothing_and_is_retried_later(proxied, llama, s3, mode, reason, caplog):
    caplog.set_level(logging.INFO)
    proxy, server = proxied
    name = f"acme/{mode}"
    s3.upload(llama.store / "lokr", f"tenants/{name}")
    proxy.mode = mode
    try:
        response = generate(server, [name])
    finally:
        proxy.mode = "pass"
    assert response.status_code == 424 and response.json()["error_type"] == "adapter_load", response.text
    assert metric(server, f'mixserve:adapter_fetches_total{{outcome="{reason}"}}') >= 1
    assert listed(server).get(name, {}).get("state") != "loaded"
    disk = server.state.store.remote.disk
    assert disk.latest(name) is None and not any((disk.root / ".partial").iterdir())
    assert_no_secrets(response.text, caplog, s3, proxy.url)
    deadline = time.monotonic() + 30
    while (response := generate(server, [name])).status_code != 200:  # after the failure's backoff
        assert response.status_code == 424 and time.monotonic() < deadline, response.text
        time.sleep(0.1)
    assert response.json()["generated_text"] == expected(server, llama, ["lokr"])


def test_an_unreachable_source_is_424_without_its_address(serve, llama, s3, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    server = serve(settings(llama, s3, tmp_path, endpoint=endpoint))
    response = generate(server, ["acme/first"])
    assert response.status_code == 424 and "unreachable" in response.json()["error"], response.text
    assert metric(server, 'mixserve:adapter_fetches_total{outcome="unreachable"}') == 1
    assert_no_secrets(response.text, caplog, s3, endpoint)
    assert generate(server, ["lora"]).status_code == 200


def test_access_denied_is_424(serve, llama, s3, tmp_path, caplog, monkeypatch):
    import moto.settings

    caplog.set_level(logging.INFO)
    s3.upload(llama.store / "lora", "tenants/acme/denied")
    server = serve(settings(llama, s3, tmp_path))
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks keys: ours are unknown
    response = generate(server, ["acme/denied"])
    monkeypatch.undo()
    assert response.status_code == 424 and "denied" in response.json()["error"], response.text
    assert_no_secrets(response.text, caplog, s3, s3.url)


def assert_no_secrets(text: str, caplog, s3, *urls: str) -> None:
    secrets = [ACCESS_KEY, SECRET_KEY, BUCKET, "tenants/", s3.url, *urls]
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("server")]
    for secret in secrets:
        assert secret not in text
        assert not [line for line in logged if secret in line], secret


def test_the_disk_budget_evicts_the_least_recently_used(serve, llama, s3, tmp_path):
    size = sum((llama.store / "lora" / f).stat().st_size for f in FILES)
    for name in ("a", "b", "c"):
        s3.upload(llama.store / "lora", f"tenants/acme/lru-{name}")
    server = serve(settings(llama, s3, tmp_path, disk_cache=int(size * 2.5), max_loaded_adapters=1, host_cache=0))
    for name in ("a", "b", "a", "c"):  # each request reads from disk: one resident, no host tier
        assert generate(server, [f"acme/lru-{name}"]).status_code == 200
    disk = server.state.store.remote.disk
    assert {n for n in disk.names()} == {"acme/lru-a", "acme/lru-c"}
    assert disk.usage()[1] <= size * 2.5
    assert generate(server, ["acme/lru-b"]).status_code == 200  # fetched again


def test_tenants_see_only_their_mount_and_adapter_source_must_agree(serve, llama, s3, tmp_path):
    s3.upload(llama.store / "lora", "tenants/globex/private")
    s3.upload(llama.store / "lora", "tenants/acme/mine")
    keys = "acme-key-0001:acme/,admin-key-0001"
    server = serve(settings(llama, s3, tmp_path, api_keys=keys))
    acme = {"Authorization": "Bearer acme-key-0001"}

    def post(adapters, headers=acme, **parameters):
        body = {"inputs": PROMPT, "adapters": adapters, "parameters": {"max_new_tokens": 2, **parameters}}
        return httpx.post(f"{server.url}/generate", json=body, headers=headers, timeout=120)

    hidden, missing = post(["globex/private"]), post(["globex/nothing-here"])
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"].replace("private", "X") == missing.json()["error"].replace("nothing-here", "X")
    assert post(["acme/mine"], adapter_source="s3").status_code == 200
    for source, adapters in (("hub", ["acme/mine"]), ("local", ["acme/mine"]), ("s3", ["lora"]), ("http", ["lora"])):
        response = post(adapters, headers={"Authorization": "Bearer admin-key-0001"}, adapter_source=source)
        assert response.status_code == 422, (source, response.text)
    for name in (f"s3://{BUCKET}/tenants/globex/private", "acme/../globex/private", "https://example.com/x"):
        assert post([name]).status_code in (404, 422)
    assert "globex/private" not in httpx.get(f"{server.url}/adapters?all=true", headers=acme).text


def test_mounts_are_validated_at_start(llama):
    for bad in ("acme/=ftp://x/", "acme/=s3://Not_A_Bucket/", "=s3://bucket/", "acme/=s3://bucket/,acme/=hf://org"):
        with pytest.raises(ValueError, match="MIXSERVE_ADAPTER_SOURCES"):
            llama.settings(adapter_sources=bad)


def test_the_store_without_mounts_is_the_local_folder(llama):
    store = AdapterStore(llama.store)
    assert not store.mounted("acme/x") and store.tier("lora") == "disk" and store.source_kind("lora") == "local"


LFS = {"adapter_model.safetensors"}  # the Hub's LFS (or Xet) files; the config is a regular git file


def git_sha1(data: bytes) -> str:
    """A regular file's git blob id (`git hash-object`): the Hub's ETag of a file that is not in LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_etag(filename: str, data: bytes) -> str:
    """The Hub's ETag of a file: the SHA-256 of an LFS file's bytes, the git blob SHA-1 of another."""
    return hashlib.sha256(data).hexdigest() if filename in LFS else git_sha1(data)


def hub_repo(cache: Path, repo: str, commits: dict[str, Path], refs: dict[str, str], links: str = "blobs") -> None:
    """A repo in huggingface_hub's documented cache layout: models--org--name/{blobs,refs,snapshots}; blobs are
    named by their ETag, snapshot files are links to them. `links`: "blobs" (those links); "shared" (LFS blobs are in
    turn links into the cache-wide store of Xet files, blobs/<2 hex>/<Xet hash>, as huggingface_hub writes with
    hf_xet); "none" (no links: each snapshot file the blob itself, as huggingface_hub writes where symlinks are not
    supported)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    for commit, folder in commits.items():
        (root / "snapshots" / commit).mkdir(parents=True)
        for filename in FILES:
            data = (folder / filename).read_bytes()
            blob, pointer = hub_etag(filename, data), root / "snapshots" / commit / filename
            if links == "none":
                pointer.write_bytes(data)
                continue
            (root / "blobs" / blob).write_bytes(data)
            if links == "shared" and filename in LFS:
                xet = hashlib.sha256(b"xet" + data).hexdigest()  # a Xet hash: 64 hex digits, not the SHA-256
                (cache / "blobs" / xet[:2]).mkdir(parents=True, exist_ok=True)
                (root / "blobs" / blob).replace(cache / "blobs" / xet[:2] / xet)
                (root / "blobs" / blob).symlink_to(f"../../blobs/{xet[:2]}/{xet}")
            pointer.symlink_to(f"../../blobs/{blob}")
    for ref, commit in refs.items():
        (root / "refs" / ref).write_text(commit)


def test_hub_offline_from_its_cache_with_revision_pins(serve, llama, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache, old, new = tmp_path / "hf-cache", "a" * 40, "b" * 40
    hub_repo(
        cache, "org/pirate", {old: llama.store / "lora", new: llama.store / "lora.patterns"}, {"main": new, "v1": old}
    )
    hub_repo(cache, "org/damaged", {old: llama.store / "lora"}, {"main": old})
    blob = next(p for p in (cache / "models--org--damaged" / "blobs").iterdir() if p.stat().st_size > 1024)
    blob.write_bytes(blob.read_bytes()[:-8] + b"\0" * 8)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read by huggingface_hub when imported
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    mounts = f"shared/=hf://org,pinned/pirate=hf://org/pirate@v1,commit/pirate=hf://org/pirate@{old}"
    server = serve(llama.settings(adapter_sources=mounts, disk_cache_dir=tmp_path / "disk", load_retry_seconds=0.2))
    for name, local in (("shared/pirate", "lora.patterns"), ("pinned/pirate", "lora"), ("commit/pirate", "lora")):
        response = generate(server, [name], adapter_source="hub")
        assert response.status_code == 200, response.text
        assert response.json()["generated_text"] == expected(server, llama, [local]), name
    absent = generate(server, ["shared/absent"])
    assert absent.status_code == 424 and "HF_HUB_OFFLINE" in absent.json()["error"], absent.text
    damaged = generate(server, ["shared/damaged"])
    assert damaged.status_code == 424 and "integrity" in damaged.json()["error"], damaged.text
    assert str(cache) not in absent.text + damaged.text
    invalid = generate(server, ["shared/a..b"])  # a valid store name, not a valid Hub repo id
    assert invalid.status_code == 404 and "org/" not in invalid.text, invalid.text
    tiers = {a["name"]: a["tier"] for a in httpx.get(f"{server.url}/adapters?all=true").json()["adapters"]}
    assert tiers["shared/pirate"] == "device" and "shared/damaged" not in tiers


def test_hub_offline_from_a_cache_with_a_shared_xet_store_or_without_links(serve, llama, tmp_path, monkeypatch):
    """Caches as huggingface_hub also writes them: LFS blobs linking into the store of Xet files shared between repos
    (named by their Xet hash, not by their SHA-256), checked against the name of the blob the snapshot links to; or,
    on a filesystem without symlinks, snapshot files that are the blobs themselves: nothing records their hash, they
    are served unchecked (not refused forever)."""
    from huggingface_hub import constants

    cache, commit = tmp_path / "hf-cache", "a" * 40
    hub_repo(cache, "org/shared", {commit: llama.store / "lora"}, {"main": commit}, links="shared")
    hub_repo(cache, "org/damaged", {commit: llama.store / "lora.patterns"}, {"main": commit}, links="shared")
    hub_repo(cache, "org/unlinked", {commit: llama.store / "lokr"}, {"main": commit}, links="none")
    damaged = next(p for p in (cache / "models--org--damaged" / "blobs").iterdir() if p.is_symlink()).resolve()
    damaged.write_bytes(damaged.read_bytes()[:-8] + b"\0" * 8)  # org/damaged's weights, in the Xet store
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    server = serve(llama.settings(adapter_sources="shared/=hf://org", disk_cache_dir=tmp_path / "disk"))
    for name, local in (("shared/shared", "lora"), ("shared/unlinked", "lokr")):
        response = generate(server, [name])
        assert response.status_code == 200, response.text
        assert response.json()["generated_text"] == expected(server, llama, [local]), name
    response = generate(server, ["shared/damaged"])
    assert response.status_code == 424 and "integrity" in response.json()["error"], response.text


def test_compose_serves_demo_adapters_from_its_minio():
    import yaml

    from server.adapters.sources import SourceOptions, parse_mounts
    from server.config import Settings
    from tests.conftest import REPO

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    replica, minio, seed = services["mixserve"], services["minio"], services["minio-seed"]
    env = replica["environment"]
    assert set(env) <= {f"MIXSERVE_{name.upper()}" for name in Settings.model_fields}
    (mount,) = parse_mounts(env["MIXSERVE_ADAPTER_SOURCES"], SourceOptions())
    assert env["MIXSERVE_S3_ENDPOINT_URL"] == "http://minio:9000" and minio["expose"] == ["9000"]
    assert minio["image"].startswith("minio/minio:") and seed["image"].startswith("minio/mc:")
    assert replica["depends_on"]["minio-seed"]["condition"] == "service_completed_successfully"
    assert seed["depends_on"]["minio"]["condition"] == "service_healthy"
    seeding = " ".join(seed["command"])
    assert (
        f"local/{mount.source.bucket}/{mount.source.prefix}" in seeding
        and "./adapters_store:/seed:ro" in seed["volumes"]
    )

    def env(path: str) -> dict[str, str]:
        lines = (REPO / path).read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))

    root, server = env(minio["env_file"]), env(replica["env_file"])
    assert set(root) == {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}  # MinIO's root user: never the replicas'
    assert set(server) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
    assert server["AWS_ACCESS_KEY_ID"] != root["MINIO_ROOT_USER"]
    assert seed["env_file"] == [minio["env_file"], replica["env_file"]]
    policy_file = next(v.split(":")[0] for v in seed["volumes"] if v.endswith("mixserve-read.json:ro"))
    for step in (
        "mc admin policy create local mixserve-read /policy/mixserve-read.json",
        'mc admin user add local "$$AWS_ACCESS_KEY_ID" "$$AWS_SECRET_ACCESS_KEY"',
        'mc admin policy attach local mixserve-read --user "$$AWS_ACCESS_KEY_ID"',
    ):
        assert step in seeding, step
    statements = json.loads((REPO / policy_file).read_text())["Statement"]
    assert {action for s in statements for action in s["Action"]} == {"s3:GetObject", "s3:ListBucket"}
    assert all(s["Effect"] == "Allow" for s in statements)
    objects = f"arn:aws:s3:::{mount.source.bucket}/{mount.source.prefix}/*"
    assert [s["Resource"] for s in statements if "s3:GetObject" in s["Action"]] == [[objects]]
    assert "minio-data" in compose["volumes"]


def test_kubernetes_s3_patch_fits_the_deployment():
    import yaml

    from server.adapters.sources import SourceOptions, parse_mounts
    from server.config import Settings
    from tests.conftest import REPO

    k8s = REPO / "deploy" / "k8s"
    deployment = yaml.safe_load((k8s / "deployment.yaml").read_text())
    patch = yaml.safe_load((k8s / "adapters-s3.yaml").read_text())
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container["name"] == deployment["spec"]["template"]["spec"]["containers"][0]["name"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= {f"MIXSERVE_{name.upper()}" for name in Settings.model_fields}
    assert len(parse_mounts(env["MIXSERVE_ADAPTER_SOURCES"], SourceOptions())) == 2
    assert Path(env["MIXSERVE_DISK_CACHE_DIR"]).is_relative_to(container["volumeMounts"][0]["mountPath"])
    assert container["envFrom"][0]["secretRef"]["name"] == "mixserve-s3"  # credentials from a Secret, none inline
    assert patch["spec"]["template"]["spec"]["volumes"][0]["emptyDir"]


def test_a_hung_source_holds_only_the_requests_that_name_its_adapters(serve, llama, s3, tmp_path):
    """Configs of mounted adapters are fetched in a pool of their mount's own: twelve requests stuck on a source
    that accepts and never answers leave requests for the base model and for local adapters unaffected."""
    proxy = Proxy(s3.url)
    server = serve(settings(llama, s3, tmp_path, endpoint=proxy.url, fetch_timeout=60))

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

            async def status(adapters: list[str]) -> int:
                body = {"inputs": PROMPT, "adapters": adapters, "parameters": {"max_new_tokens": 2}}
                return (await client.post("/generate", json=body)).status_code

            proxy.mode = "hang"
            stuck = [asyncio.create_task(status([f"acme/cold{i}"])) for i in range(12)]
            await asyncio.sleep(0.5)  # they reach the source (not needed for what is asserted)
            base, local = await status([]), await status(["lora"])
            waiting = sum(not task.done() for task in stuck)
            proxy.mode = "pass"  # closes the hung connections: the stuck requests end (404: no such objects)
            return base, local, waiting, await asyncio.gather(*stuck)

    base, local, waiting, stuck = asyncio.run(run())
    assert base == local == 200 and waiting == 12
    assert set(stuck) <= {404, 424}


class FolderSource(AdapterSource):
    """A source of local folders by key, at versions the test sets; `down` makes every call fail as unreachable."""

    scheme = kind = "folders"

    def __init__(self, folders: dict[str, Path]):
        super().__init__("folders", SourceOptions())
        self.folders, self.versions, self.down = folders, dict.fromkeys(folders, "v1"), False

    def version(self, key: str) -> str:
        if self.down:
            raise SourceError("unreachable")
        return self.versions[key]

    def fetch(self, key: str, version: str, into: Path) -> None:
        if self.down:
            raise SourceError("unreachable")
        if version != self.versions[key]:
            raise SourceError("changed", f"{key} is no longer at {version}")
        for filename in FILES:
            shutil.copyfile(self.folders[key] / filename, into / filename)


def folder_store(llama, tmp_path, budget=10**9, **options) -> tuple[AdapterStore, FolderSource]:
    source = FolderSource({"a": llama.store / "lora", "b": llama.store / "lokr"})
    remote = RemoteAdapters([Mount("acme/", source)], DiskTier(tmp_path / "disk", budget), **options)
    return AdapterStore(llama.store, remote=remote), source


@pytest.mark.parametrize("found", ["on disk", "fetched"])
def test_a_version_being_read_is_never_evicted_by_another_fetch(llama, tmp_path, monkeypatch, found):
    """A budget of less than one adapter: fetching b evicts every other version not being read. It is fetched right
    after a's folder is found (or put), before a is read: a must still be there."""
    store, _ = folder_store(llama, tmp_path, budget=1)
    if found == "on disk":
        store.read("acme/a")
    hooked = DiskTier.get if found == "on disk" else DiskTier.put
    interleaved = []

    def then_fetch_b(disk, name, *args, **kwargs):
        folder = hooked(disk, name, *args, **kwargs)
        if name == "acme/a" and folder is not None and not interleaved:
            interleaved.append(folder)
            store.read("acme/b")
        return folder

    monkeypatch.setattr(DiskTier, hooked.__name__, then_fetch_b)
    files = store.read("acme/a")
    assert interleaved and files.tensors and files.config["peft_type"] == "LORA"


def test_a_remembered_failure_is_raised_as_a_new_exception_each_time(llama, tmp_path):
    """One exception object raised in several requests would share its traceback and context between them."""
    store, source = folder_store(llama, tmp_path, retry_seconds=60)
    source.down = True
    errors = []
    for _ in range(3):
        with pytest.raises(AdapterLoadFailed) as raised:
            store.read("acme/a")
        errors.append(raised.value)
    assert len({id(e) for e in errors}) == 3 and len({str(e) for e in errors}) == 1
    assert all(e.__context__ is None for e in errors[1:])


def test_a_version_gone_at_the_source_is_looked_at_again_at_once(llama, s3, tmp_path):
    """S3's 412 on If-Match (the object replaced since its ETag was read) makes the next step look at the version
    again, not serve the stale ETag's failure until check_seconds."""
    options = SourceOptions(timeout=2, s3_endpoint_url=s3.url)
    mounts = parse_mounts(f"acme/=s3://{BUCKET}/tenants/acme/", options)
    remote = RemoteAdapters(mounts, DiskTier(tmp_path / "disk", 10**9), check_seconds=3600)
    store = AdapterStore(llama.store, remote=remote)
    s3.upload(llama.store / "lora", "tenants/acme/replaced")
    first = store.read("acme/replaced")
    remote.disk.drop(remote.disk.latest("acme/replaced")[0])  # evicted: the next read fetches the version last seen
    s3.upload(llama.store / "lokr", "tenants/acme/replaced")
    second = store.read("acme/replaced")
    assert first.config["peft_type"] == "LORA" and second.config["peft_type"] == "LOKR"
    assert second.signature != first.signature


class GatedSource(FolderSource):
    """Looking at `gated`'s version waits until released."""

    def __init__(self, folders: dict[str, Path], gated: str):
        super().__init__(folders)
        self.gated, self.calls = gated, 0
        self.entered, self.release = threading.Event(), threading.Event()

    def version(self, key: str) -> str:
        if key == self.gated:
            self.calls += 1
            self.entered.set()
            self.release.wait(120)
        return super().version(key)


def test_one_slow_adapter_holds_one_fetch_of_its_mount_not_the_others(serve, llama, s3, tmp_path):
    """Three times as many requests as a mount has fetch threads wait for one slow adapter: they share one fetch, and
    another adapter of the same mount, one of another mount and a local one are served meanwhile."""
    from server.api.serving import MOUNT_THREADS

    server = serve(settings(llama, s3, tmp_path))
    remote = server.state.store.remote
    source = GatedSource({"slow": llama.store / "lora", "fast": llama.store / "lokr"}, gated="slow")
    remote.mounts[:] = [Mount(m.name, source) if m.name == "acme/" else m for m in remote.mounts]
    s3.upload(llama.store / "loha", "tenants/globex/other")

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

            async def status(adapters: list[str]) -> int:
                body = {"inputs": PROMPT, "adapters": adapters, "parameters": {"max_new_tokens": 2}}
                return (await client.post("/generate", json=body)).status_code

            slow = [asyncio.create_task(status(["acme/slow"])) for _ in range(3 * MOUNT_THREADS)]
            try:
                assert await asyncio.to_thread(source.entered.wait, 60)
                others = [await status(names) for names in (["acme/fast"], ["globex/other"], ["lora"])]
                waiting = sum(not task.done() for task in slow)
            finally:
                source.release.set()
            return others, waiting, await asyncio.gather(*slow)

    others, waiting, slow = asyncio.run(run())
    assert others == [200, 200, 200] and waiting == len(slow)
    assert set(slow) == {200} and source.calls == 1


class FakeHub(ThreadingHTTPServer):
    """The Hub's endpoints huggingface_hub uses for one repo at one commit: model info, and each file's resolve URL
    (HEAD: commit, ETag as the Hub's: the SHA-256 of an LFS file, the git blob SHA-1 of another; size; GET: the bytes).
    `flip` names files whose next GET answers one byte flipped; `heads` and `gets` list the files asked for."""

    def __init__(self, repo: str, commit: str, folder: Path):
        self.repo, self.commit, self.flip, self.gets, self.heads = repo, commit, set(), [], []
        self.files = {name: (folder / name).read_bytes() for name in FILES}
        super().__init__(("127.0.0.1", 0), self.Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def answer(self, body: bytes) -> None:
            hub: FakeHub = self.server
            if self.path.split("?")[0] in (f"/api/models/{hub.repo}", f"/api/models/{hub.repo}/revision/main"):
                data = json.dumps({"id": hub.repo, "sha": hub.commit}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data if body else b"")
                return
            name = self.path.removeprefix(f"/{hub.repo}/resolve/{hub.commit}/")
            if name not in hub.files:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = hub.files[name]
            self.send_response(200)
            self.send_header("X-Repo-Commit", hub.commit)
            self.send_header("ETag", f'"{hub_etag(name, data)}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not body:
                hub.heads.append(name)
            else:
                hub.gets.append(name)
                if name in hub.flip:
                    hub.flip.discard(name)
                    data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
                self.wfile.write(data)

        def do_HEAD(self):
            self.answer(body=False)

        def do_GET(self):
            self.answer(body=True)


@pytest.mark.parametrize("symlinks", [True, False], ids=["symlinks", "no-symlinks"])
@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "adapter_config.json"], ids=["lfs", "git"])
def test_hub_downloads_within_the_disk_tier_and_a_damaged_one_is_downloaded_again(
    serve, llama, tmp_path, monkeypatch, symlinks, damaged
):
    """Online, nothing is written to huggingface_hub's own cache (outside MIXSERVE_DISK_CACHE's budget): each fetch
    downloads into the disk tier's folder being written. A download damaged in transit fails its hash check (424: an
    LFS file's SHA-256, a regular file's git SHA-1) and the next attempt downloads it again, rather than reading the
    damaged blob from a cache forever. Where symlinks are not supported (SMB, some FUSE or NFS mounts, Windows without
    developer mode) huggingface_hub's cache has no blob named by its hash: the hash is the file's ETag, asked again;
    with them, the name of the blob downloaded is the ETag, and nothing is asked twice."""
    import huggingface_hub.file_download
    from huggingface_hub import constants

    hub = FakeHub("org/pirate", "c" * 40, llama.store / "lora")
    hf_cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # both read from HF_ENDPOINT when huggingface_hub is imported
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache))
    if not symlinks:
        monkeypatch.setattr(huggingface_hub.file_download, "are_symlinks_supported", lambda *a, **k: False)
    server = serve(
        llama.settings(adapter_sources="shared/=hf://org", disk_cache_dir=tmp_path / "disk", load_retry_seconds=0.2)
    )
    hub.flip.add(damaged)
    response = generate(server, ["shared/pirate"])
    assert response.status_code == 424 and "integrity" in response.json()["error"], response.text
    deadline = time.monotonic() + 30
    while (response := generate(server, ["shared/pirate"])).status_code != 200:  # after the failure's backoff
        assert response.status_code == 424 and time.monotonic() < deadline, response.text
        time.sleep(0.1)
    assert response.json()["generated_text"] == expected(server, llama, ["lora"])
    first = FILES[: FILES.index(damaged) + 1]  # the first attempt stops at the damaged file
    assert sorted(hub.gets) == sorted(first + FILES)
    per_download = 1 if symlinks else 2  # huggingface_hub's HEAD; without symlinks, ours for the ETag
    assert sorted(hub.heads) == sorted((first + FILES) * per_download)
    assert not hf_cache.exists() or not any(hf_cache.rglob("*"))
    assert not any((tmp_path / "disk" / ".partial").iterdir())
