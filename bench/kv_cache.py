"""The paged KV cache against the slot cache it replaced, side by side in one run.

    python -m bench.kv_cache [--device cuda --dtype bfloat16] [--quick]            (make bench-kv-cache)

Contenders: (old) the server at BASELINE, the commit before the paged cache (its `server/` extracted with git
archive), and (new) this tree; each runs the same workload in a subprocess of its own, in the engine (no HTTP).
  (a) memory: 15 clients of short requests, then one long request among them, then short ones again: the bytes the
      cache holds (old: its tensors; new: blocks in use) against the bytes the live tokens need, before, during
      and after the long request; and the process's resident memory
  (b) throughput of short requests only (16 clients, mixed adapters), old and new alternated: new/old (target 0.95)
  (c) a budget too small for every row: requests answered, preemptions, answers equal to a roomy cache's
  (d) the attention read of one decode step (16 rows of 32..700 tokens, Qwen2.5-0.5B's heads): SDPA over the slot
      cache's views, over each row's gathered blocks (ours), and over all rows flattened into one sequence with a
      block-diagonal mask (the layout of transformers' paged/continuous-batching attention)
  (e) the prefix cache (this tree, on and off, alternated): 16 combinations, one client each, sending requests on a
      shared 512-token system prompt and a short suffix of their own: time to first token p50 off/on (target 3),
      throughput on/off, and whether the answers are the same
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

BASELINE = "8266af5"  # the commit before the paged cache
CLIENTS, SHORT_PROMPT, SHORT_NEW = 16, 32, 32
MIXES = [[], ["lora-0"], ["lora-1", "loha-0"], ["oft-0", "lora-2"], ["lokr-0"], ["loha-1", "lora-3", "oft-0"]]
SYSTEM_TOKENS, SUFFIX_TOKENS, PREFIX_NEW = 512, 16, 16
COMBINATIONS = [  # (names, weights): the mixes, more single adapters, and some of them weighted
    *((tuple(mix), ()) for mix in MIXES),
    *(((name,), ()) for name in ("lora-1", "lora-2", "lora-3", "loha-0", "loha-1", "oft-0")),
    (("lora-0",), (0.5,)),
    (("lokr-0",), (0.5,)),
    (("lora-1", "loha-0"), (0.5, 1.0)),
    (("oft-0", "lora-2"), (1.0, 0.5)),
]


# --- the worker: runs in a subprocess against one tree's `server` package


def _worker(task: dict) -> dict:
    import torch

    torch.set_num_threads(task["threads"])
    from server.config import Settings
    from server.state import ServerState

    def start(**overrides) -> ServerState:
        values = {"model": task["model"], "adapters_dir": task["store"], "device": task["device"]}
        values["dtype"] = task["dtype"]
        return ServerState.start(Settings(**values, max_batch_size=CLIENTS, **overrides))

    if task["name"] == "memory":
        state = start()
        try:
            return asyncio.run(_memory(state, task["long"]))
        finally:
            state.stop()
    if task["name"] == "throughput":
        state = start()
        try:
            return asyncio.run(_throughput(state, task["requests"]))
        finally:
            state.stop()
    if task["name"] == "prefix":
        state = start(prefix_cache=task["prefix_cache"])
        try:
            return asyncio.run(_prefix(state, task["requests"]))
        finally:
            state.stop()
    probe = start()
    block_bytes = probe.engine.runner.cache.block_bytes
    roomy = asyncio.run(_throughput(probe, task["requests"], new_tokens=64))
    probe.stop()
    state = start(max_input_tokens=64, max_new_tokens=64, kv_cache_memory=task["blocks"] * block_bytes)
    try:
        tight = asyncio.run(_throughput(state, task["requests"], new_tokens=64))
        tight["preemptions"] = state.engine.preemptions
        tight["blocks"] = state.engine.runner.cache.pool.total
        tight["same"] = tight.pop("answers") == roomy.pop("answers")
        tight["roomy_tps"] = roomy["tokens_per_second"]
        return tight
    finally:
        state.stop()


def _request(i: int, prompt_tokens: int, new_tokens: int):
    from server.adapters.combination import Combination
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import GenerationRequest

    ids = [3 + (7 * i + 13 * j) % 250 for j in range(prompt_tokens)]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return GenerationRequest(f"r{i}", ids, Combination(tuple(MIXES[i % len(MIXES)])), params)


async def _clients(engine, requests: int, new_tokens: int, answers: dict, stop=None) -> None:
    """CLIENTS clients, each sending requests one after another (until `requests` are sent, or stop is set)."""
    counter = iter(range(requests))

    async def client() -> None:
        for i in counter:
            if stop is not None and stop.is_set():
                return
            seq = await engine.generate(_request(i, SHORT_PROMPT, new_tokens))
            answers[i] = seq.tokens

    await asyncio.gather(*(client() for _ in range(CLIENTS)))


async def _throughput(state, requests: int, new_tokens: int = SHORT_NEW) -> dict:
    answers: dict[int, list[int]] = {}
    await _clients(state.engine, CLIENTS, new_tokens, {})  # warm-up
    started = time.perf_counter()
    await _clients(state.engine, requests, new_tokens, answers)
    seconds = time.perf_counter() - started
    return {
        "tokens_per_second": sum(len(t) for t in answers.values()) / seconds,
        "answered": len(answers),
        "answers": [answers[i] for i in sorted(answers)],
    }


async def _prefix(state, per_client: int) -> dict:
    """One client per combination: a first request each (on: its prefix computed and cached), then per_client more
    each, measured: time to first token of each, generated tokens per second."""
    from server.adapters.combination import Combination
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import GenerationRequest

    engine, system = state.engine, [3 + (11 * j) % 250 for j in range(SYSTEM_TOKENS)]
    params = SamplingParams(max_new_tokens=PREFIX_NEW, ignore_eos=True)
    ttft: list[float] = []
    answers: dict[str, list[int]] = {}

    async def client(c: int, requests: range) -> None:
        for k in requests:
            suffix = [3 + (31 * c + 17 * k + j) % 250 for j in range(SUFFIX_TOKENS)]
            request = GenerationRequest(f"p{c}-{k}", system + suffix, Combination(*COMBINATIONS[c]), params)
            seq = await engine.generate(request)
            answers[request.request_id] = seq.tokens
            if k:
                ttft.append(seq.first_token_at - seq.submitted_at)

    clients = range(len(COMBINATIONS))
    await asyncio.gather(*(client(c, range(1)) for c in clients))
    started = time.perf_counter()
    await asyncio.gather(*(client(c, range(1, per_client + 1)) for c in clients))
    seconds = time.perf_counter() - started
    runner = engine.runner
    return {
        "ttft_p50": statistics.median(ttft),
        "tokens_per_second": len(clients) * per_client * PREFIX_NEW / seconds,
        "hit_rate": runner.prefix_hit_tokens / max(1, runner.prefix_queried_tokens),
        "answers": answers,
    }


def _cache_bytes(engine) -> tuple[int, int, int]:
    """(bytes the cache holds, bytes the live tokens need, running rows), read on the engine's thread."""
    cache, rows = engine.runner.cache, engine.runner.rows
    if hasattr(cache, "pool"):  # paged
        held, token_bytes = cache.pool.used * cache.block_bytes, cache.block_bytes // 16
    else:  # slot cache: [rows, heads, length, dim] per layer
        tensors = [*cache.keys.values(), *cache.values.values()]
        held = sum(t.numel() * t.element_size() for t in tensors)
        token_bytes = sum(t[0, :, 0].numel() * t.element_size() for t in tensors)
    return held, sum(s.num_tokens for s in rows) * token_bytes, len(rows)


def _rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


async def _memory(state, long_tokens: int) -> dict:
    """Short clients throughout; the long request joins once they run, and they go on after it finished."""
    engine, phases = state.engine, {"before": [], "during": [], "after": []}
    phase, stop = "before", asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            phases[phase].append(await asyncio.wrap_future(engine.call(lambda: _cache_bytes(engine))))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    shorts = asyncio.create_task(_clients(engine, 10**6, SHORT_NEW, {}, stop))
    await asyncio.sleep(2.0)
    rss = {"before": _rss()}
    phase = "during"
    await engine.generate(_request(10**6, long_tokens, 16))
    rss["during"] = _rss()
    phase = "after"
    await asyncio.sleep(2.0)
    stop.set()
    await shorts
    await sampler
    rss["after"] = _rss()
    result = {"rss": rss}
    for name, samples in phases.items():
        held = [h for h, _, _ in samples]
        result[name] = {
            "held_max": max(held),
            "held_last": held[-1],
            "live_last": samples[-1][1],
            "rows_last": samples[-1][2],
            "held_over_live_max": max(h - live for h, live, _ in samples),
        }
    cache = engine.runner.cache
    result["block_bytes"] = getattr(cache, "block_bytes", 0)
    result["reserved"] = (cache.pool.total + 1) * cache.block_bytes if hasattr(cache, "pool") else None
    return result


# --- the parent


def _baseline_tree(root: Path) -> Path:
    """BASELINE's server package (and its demo), extracted from git."""
    tree = root / "baseline"
    tree.mkdir()
    archive = root / "baseline.tar"
    subprocess.run(
        ["git", "archive", "-o", str(archive), BASELINE, "server"], cwd=_REPO, check=True, capture_output=True
    )
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def _run(tree: Path, task: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXSERVE_")}
    env["PYTHONPATH"] = str(tree)
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{task['name']} in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _attention(quick: bool, device: str, dtype: str) -> dict[str, float]:
    """Seconds per decode step's attention read, per layer (see (d))."""
    import torch
    import torch.nn.functional as F

    from bench.common import synchronize

    torch.manual_seed(0)
    torch.set_default_device(device)
    torch.set_default_dtype(getattr(torch, dtype))
    heads, kv_heads, dim, block = 14, 2, 64, 16
    lengths = [32 + (668 * i) // 15 for i in range(16)]
    rows, longest = len(lengths), max(lengths)
    q = torch.randn(rows, heads, 1, dim)
    slots = torch.randn(rows, kv_heads, longest, dim)  # the slot cache: every row padded to the longest
    blocks_per_row = [-(-n // block) for n in lengths]
    pool = torch.randn(sum(blocks_per_row) + 1, block, kv_heads, dim)
    tables, start = torch.zeros(rows, -(-longest // block), dtype=torch.long), 1
    for r, n in enumerate(blocks_per_row):
        tables[r, :n] = torch.arange(start, start + n)
        start += n
    positions = torch.arange(longest)
    read = tables[:, positions // block] * block + positions % block  # [rows, longest]
    keys = torch.arange(longest)
    mask = torch.zeros(rows, 1, 1, longest).masked_fill_(keys >= torch.tensor(lengths)[:, None, None, None], -1e30)
    flat_len = sum(lengths)
    owner = torch.repeat_interleave(torch.arange(rows), torch.tensor(lengths))
    flat_mask = torch.zeros(1, 1, rows, flat_len).masked_fill_(
        owner[None, None, None] != torch.arange(rows)[:, None], -1e30
    )
    flat_read = torch.cat([read[r, :n] for r, n in enumerate(lengths)])

    def sdpa(query, k, v, m):
        return F.scaled_dot_product_attention(query, k, v, attn_mask=m, enable_gqa=True)

    def gathered():  # as PagedCache._gather: whole blocks, in each row's order
        return pool.index_select(0, tables.flatten()).view(rows, -1, kv_heads, dim)[:, :longest].transpose(1, 2)

    flat_pool = pool.flatten(0, 1)
    contenders = {
        "slot cache views": lambda: sdpa(q, slots, slots, mask),
        "gathered blocks (ours)": lambda: sdpa(q, *(gathered(),) * 2, mask),
        "flattened, block-diagonal": lambda: sdpa(
            q.transpose(0, 2), *(flat_pool[flat_read][None].transpose(1, 2),) * 2, flat_mask
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(3 if quick else 30):
        for name, fn in contenders.items():
            synchronize(device)
            started = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - started)
    torch.set_default_device("cpu")
    torch.set_default_dtype(torch.float32)
    return {name: statistics.median(t) for name, t in times.items()}


_REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model, few requests: checks that it runs")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--rounds", type=int, default=3, help="throughput runs per contender, alternated")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu, cuda")  # bench.common's, which a worker cannot import
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    sys.path.insert(0, str(_REPO))
    import torch

    from bench.common import build_bench_model, describe_run

    print(describe_run(args.device, args.dtype))
    print(f"old: the slot cache at {BASELINE}; new: this tree's paged cache (blocks of 16 tokens)")
    quick, rounds = args.quick, 1 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, store = build_bench_model(args.workdir or Path(tmp), quick=quick)
        trees = {"old": _baseline_tree(Path(tmp)), "new": _REPO}
        base = {"model": str(model_dir), "store": str(store), "threads": torch.get_num_threads()}
        base.update(device=args.device, dtype=args.dtype)

        print(f"\n(a) memory: {CLIENTS - 1} short clients ({SHORT_PROMPT}+{SHORT_NEW} tokens), one long request joins")
        long_tokens = 256 if quick else 2048
        print(f"    long request: {long_tokens} prompt tokens + 16 new; MiB held by the cache (and by live tokens)")
        print(
            f"{'':6s} {'before':>9s} {'during':>9s} {'after':>17s} {'over live':>10s} {'RSS before/during/after':>26s}"
        )
        for name, tree in trees.items():
            m = _run(tree, {**base, "name": "memory", "long": long_tokens})
            after = m["after"]
            rss = "/".join(f"{m['rss'][p] / 2**20:.0f}" for p in ("before", "during", "after"))
            print(
                f"{name:6s} {_mib(m['before']['held_max']):9.1f} {_mib(m['during']['held_max']):9.1f}"
                f" {_mib(after['held_last']):8.1f} ({_mib(after['live_last']):5.1f})"
                f" {_mib(after['held_over_live_max']):10.2f} {rss:>26s}"
            )
            if m["reserved"] is not None:
                bound = after["rows_last"] * m["block_bytes"]
                print(
                    f"       after: held - live <= one block per running row: {after['held_last'] - after['live_last']}"
                    f" <= {bound} bytes ({after['rows_last']} rows): {after['held_last'] - after['live_last'] <= bound};"
                    f" pool reserved {_mib(m['reserved']):.0f} MiB (untouched pages not resident on CPU)"
                )

        requests = 32 if quick else 128
        print(
            f"\n(b) throughput, short requests only: {requests} of {SHORT_PROMPT}+{SHORT_NEW} tokens, {CLIENTS} clients"
        )
        tps: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(rounds):
            for name, tree in trees.items():
                tps[name].append(_run(tree, {**base, "name": "throughput", "requests": requests})["tokens_per_second"])
        old, new = statistics.median(tps["old"]), statistics.median(tps["new"])
        print(f"old {old:8.1f} tok/s   new {new:8.1f} tok/s   new/old {new / old:5.2f} (target 0.95)")

        blocks = 24
        print(
            f"\n(c) a budget of {blocks} blocks ({blocks * 16} tokens) for {CLIENTS} clients of {SHORT_PROMPT}+64 tokens"
        )
        c = _run(_REPO, {**base, "name": "preempt", "requests": requests, "blocks": blocks})
        print(
            f"answered {c['answered']}/{requests}, preemptions {c['preemptions']}, answers equal to a roomy cache's:"
            f" {c['same']}; {c['tokens_per_second']:.1f} tok/s, roomy {c['roomy_tps']:.1f}:"
            f" ratio {c['tokens_per_second'] / c['roomy_tps']:.2f}"
        )

        print(
            "\n(d) attention read of one decode step, per layer: 16 rows of 32..700 tokens, 14 heads / 2 KV heads x 64"
        )
        times = _attention(quick, args.device, args.dtype)
        ours = times["gathered blocks (ours)"]
        for name, seconds in times.items():
            print(f"{name:28s} {seconds * 1e6:9.0f} us   /ours {seconds / ours:5.2f}")

        per_client = 1 if quick else 4
        print(
            f"\n(e) prefix cache: {len(COMBINATIONS)} combinations, one client each, {per_client} requests of"
            f" {SYSTEM_TOKENS} shared + {SUFFIX_TOKENS} own prompt tokens + {PREFIX_NEW} new (after one each first)"
        )
        runs: dict[str, list[dict]] = {"on": [], "off": []}
        for _ in range(rounds):
            for setting, results in runs.items():
                task = {**base, "name": "prefix", "requests": per_client, "prefix_cache": setting == "on"}
                results.append(_run(_REPO, task))
        ttft = {k: statistics.median(r["ttft_p50"] for r in v) for k, v in runs.items()}
        tps = {k: statistics.median(r["tokens_per_second"] for r in v) for k, v in runs.items()}
        for setting in runs:
            print(
                f"{setting:4s} TTFT p50 {ttft[setting] * 1e3:8.1f} ms   {tps[setting]:8.1f} tok/s"
                f"   hit rate {runs[setting][0]['hit_rate']:.2f}"
            )
        same = all(r["answers"] == runs["off"][0]["answers"] for r in runs["on"] + runs["off"])
        print(
            f"TTFT p50 off/on {ttft['off'] / ttft['on']:5.2f} (target 3)   throughput on/off {tps['on'] / tps['off']:5.2f}"
            f"   answers the same: {same}"
        )


def _mib(n: int) -> float:
    return n / 2**20


if __name__ == "__main__":
    main()
