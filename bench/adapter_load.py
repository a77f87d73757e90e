"""Adapter loading: cold loads, host-tier reloads, and what loading does to other streams.

    python -m bench.adapter_load [--kinds others] [--device cuda --dtype bfloat16] [--quick]   (make bench-adapters)

On the throughput bench's model (Llama hidden 512 x 8 layers, float32) with LoRA r16 adapters on all linear
modules (--kinds others: LoHa, LoKr and OFT in turn), behind real HTTP on loopback:
  * cold load: POST /adapters/{name}/load of an adapter never loaded (files read from disk - the page cache, as
    they were just written - checked, built, attached), p50/p95 over 20 adapters; also the server's own timing;
  * host-tier reload: the same call for an adapter evicted to host memory (MIXSERVE_MAX_LOADED_ADAPTERS=1 forces
    the evictions);
  * inter-token gap p99 of 8 streams of the base model while 20 different adapters load, as a ratio to the same
    streams with no loading going on (rounds interleaved);
  * from object storage: the same adapters in a local S3 server (moto's server mode, on loopback) mounted under
    s3/: cold fetch + load (version check, download into the disk tier, read, check, build, attach), then after
    unloading them, the disk-tier load (no network: the version was checked within MIXSERVE_REMOTE_CHECK_SECONDS).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig

from bench.common import add_device_arguments, build_bench_model, describe_run, mixserve, prompt
from server.demo.tiny import save_adapter

COLD = 20
STREAMS, STREAM_TOKENS = 8, 160
HOST_RELOADS = 10


KINDS = {
    "lora": [(LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False), 0.3)],
    "others": [  # LoHa, LoKr and OFT in turn
        (LoHaConfig(r=8, alpha=8, target_modules="all-linear", init_weights=False), 0.5),
        (LoKrConfig(r=8, alpha=8, target_modules="all-linear", init_weights=False), 0.3),
        (OFTConfig(r=0, oft_block_size=32, target_modules="all-linear", init_weights=False), 0.3),
    ],
}


def build_adapters(model_dir: Path, store: Path, count: int, kinds: str) -> list[str]:
    names = [f"cold-{i:02d}" if kinds == "lora" else f"cold-{kinds}-{i:02d}" for i in range(count)]
    for seed, name in enumerate(names, start=100):
        if not (store / name / "adapter_config.json").is_file():
            config, scale = KINDS[kinds][seed % len(KINDS[kinds])]
            save_adapter(model_dir, copy.deepcopy(config), store / name, seed=seed, base_name="bench", scale=scale)
    return names


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100)[p - 1] if len(values) > 1 else values[0]


def timed_load(client: httpx.Client, name: str) -> tuple[float, float]:
    started = time.perf_counter()
    response = client.post(f"/adapters/{name}/load")
    response.raise_for_status()
    return (time.perf_counter() - started) * 1e3, response.json()["last_load_ms"]


async def stream_gaps(url: str, during=None, streams: int = STREAMS, tokens: int = STREAM_TOKENS) -> list[float]:
    """Gaps (ms) between consecutive tokens of concurrent streams; `during` runs alongside."""
    gaps: list[float] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"inputs": prompt(i), "parameters": {"max_new_tokens": tokens, "ignore_eos_token": True}}
        last = None
        async with client.stream("POST", "/generate_stream", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append((now - last) * 1e3)
                    last = now

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(streams)]
        await asyncio.sleep(0.5)  # the streams are running
        if during is not None:
            await asyncio.to_thread(during)
        await asyncio.gather(*tasks)
    return gaps


def s3_loads(model_dir: Path, store: Path, names: list[str], on: dict) -> tuple[list[float], list[float]]:
    """Wall ms of POST .../load: cold from a local S3 server (fetch + load), then from the disk tier."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench-only", AWS_SECRET_ACCESS_KEY="bench-only", AWS_DEFAULT_REGION="us-east-1"
    )
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    url = "http://{}:{}".format(*s3.get_host_and_port())
    bucket = boto3.client("s3", endpoint_url=url)
    bucket.create_bucket(Bucket="bench")
    for name in names:
        for filename in ("adapter_config.json", "adapter_model.safetensors"):
            bucket.put_object(
                Bucket="bench", Key=f"adapters/{name}/{filename}", Body=(store / name / filename).read_bytes()
            )
    try:
        with (
            tempfile.TemporaryDirectory() as disk,
            mixserve(
                model_dir,
                store,
                **on,
                adapter_sources="s3/=s3://bench/adapters/",
                s3_endpoint_url=url,
                disk_cache_dir=disk,
            ) as server,
            httpx.Client(base_url=server.url, timeout=120) as client,
        ):
            cold = [timed_load(client, f"s3/{name}")[0] for name in names]
            for name in names:
                client.delete(f"/adapters/s3/{name}").raise_for_status()
            from_disk = [timed_load(client, f"s3/{name}")[0] for name in names]
    finally:
        s3.stop()
    return cold, from_disk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--quick", action="store_true", help="a small model, few adapters: checks that it runs")
    parser.add_argument(
        "--kinds",
        choices=list(KINDS),
        default="lora",
        help="the adapters that load: LoRA r16, or LoHa r8, LoKr r8 and OFT (block 32) in turn",
    )
    add_device_arguments(parser)
    args = parser.parse_args()
    on = {"device": args.device, "dtype": args.dtype}  # where the servers run
    cold, streams, tokens, reloads = (4, 2, 24, 2) if args.quick else (COLD, STREAMS, STREAM_TOKENS, HOST_RELOADS)
    rounds = 1 if args.quick else args.rounds
    print(describe_run(args.device, args.dtype))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, store = build_bench_model(args.workdir or Path(tmp), quick=args.quick)
        names = build_adapters(model_dir, store, cold, args.kinds)
        adapter_mb = (store / names[0] / "adapter_model.safetensors").stat().st_size / 1e6

        with mixserve(model_dir, store, **on) as server, httpx.Client(base_url=server.url, timeout=120) as client:
            cold = [timed_load(client, name) for name in names]
            for name in names:
                client.delete(f"/adapters/{name}").raise_for_status()

            def load_all() -> None:
                for name in names:
                    client.post(f"/adapters/{name}/load").raise_for_status()

            quiet, loading = [], []
            for _ in range(rounds):
                quiet += asyncio.run(stream_gaps(server.url, None, streams, tokens))
                loading += asyncio.run(stream_gaps(server.url, load_all, streams, tokens))
                for name in names:
                    client.delete(f"/adapters/{name}").raise_for_status()

        with (
            mixserve(model_dir, store, **on, max_loaded_adapters=1, host_cache="1GB") as server,
            httpx.Client(base_url=server.url, timeout=120) as client,
        ):
            a, b = names[0], names[1]
            timed_load(client, a)
            timed_load(client, b)  # a goes to host memory
            host = []
            for _ in range(reloads):
                for name in (a, b):
                    assert (
                        client.get("/adapters").json()["adapters"][
                            [x["name"] for x in client.get("/adapters").json()["adapters"]].index(name)
                        ]["state"]
                        == "host"
                    )
                    started = time.perf_counter()
                    client.post(f"/adapters/{name}/load").raise_for_status()
                    host.append((time.perf_counter() - started) * 1e3)

        s3_cold, s3_disk = s3_loads(model_dir, store, names, on)

    wall, server_ms = [w for w, _ in cold], [s for _, s in cold]
    model = "quick bench model (hidden 128 x 2)" if args.quick else "bench model"
    kinds = "LoRA r16" if args.kinds == "lora" else "LoHa r8, LoKr r8 and OFT in turn"
    print(f"adapters: {kinds} on all linear modules of the {model} ({len(names)}, {adapter_mb:.1f} MB the first)\n")
    print(f"{'':34s} {'p50 ms':>8s} {'p95 ms':>8s}   target")
    print(f"{'cold load, POST .../load':34s} {percentile(wall, 50):8.1f} {percentile(wall, 95):8.1f}   p50 < 50")
    print(f"{'  of which the loader (server)':34s} {percentile(server_ms, 50):8.1f} {percentile(server_ms, 95):8.1f}")
    print(f"{'host-tier reload, POST .../load':34s} {percentile(host, 50):8.1f} {percentile(host, 95):8.1f}   p50 < 10")
    print(f"{'cold fetch + load from local S3':34s} {percentile(s3_cold, 50):8.1f} {percentile(s3_cold, 95):8.1f}")
    print(f"{'disk-tier load (fetched before)':34s} {percentile(s3_disk, 50):8.1f} {percentile(s3_disk, 95):8.1f}")
    q99, l99 = percentile(quiet, 99), percentile(loading, 99)
    print(
        f"\ninter-token gap of {streams} streams, p50 / p99 ms: quiet {percentile(quiet, 50):.1f} / {q99:.1f},"
        f" while {len(names)} adapters load {percentile(loading, 50):.1f} / {l99:.1f}"
    )
    print(f"gap ratio p99 loading / quiet = {l99 / q99:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
