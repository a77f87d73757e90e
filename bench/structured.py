"""The cost of constrained output: half the rows constrained by a JSON schema and half free, against all rows free,
side by side on one server in one run; and the time to first token of a new schema (compiled) against a cached one.

    python -m bench.structured [--quick]          (make bench-structured)

Contenders, behind real HTTP on loopback, 16 concurrent clients, each with its own combination of 1-3 adapters of
mixed types (32-token prompts, 32 new tokens, greedy), interleaved round by round:
  (a) half the clients constrained by a JSON schema (parameters.grammar), half free
  (b) every client free: the ceiling
The bench model is random: a constrained row mostly stays inside the schema's free strings, and may end early when
its grammar completes; throughput counts the tokens generated. Then TTFT: a schema the server has not seen (a new
property name each time: compiled in a worker thread), and the same schema again (cached); and the compile alone.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from bench.common import (
    ADAPTERS,
    HEADER,
    Result,
    add_device_arguments,
    build_bench_model,
    combinations,
    describe_run,
    mixserve,
    prompt,
    run_load,
)

CLIENTS, PROMPT_TOKENS = 16, 32
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}},
    },
    "required": ["name", "age", "colour", "tags", "address"],
    "additionalProperties": False,
}


def bodies(combos: list[list[str]], constrained: set[int], requests: int, new_tokens: int) -> list[list[dict]]:
    per_client: list[list[dict]] = [[] for _ in combos]
    for i in range(requests):
        client = i % len(combos)
        parameters = {"max_new_tokens": new_tokens, "details": True}
        if client in constrained:
            parameters["grammar"] = {"type": "json", "value": SCHEMA}
        per_client[client].append(
            {"inputs": prompt(i, PROMPT_TOKENS), "adapters": combos[client], "parameters": parameters}
        )
    return per_client


def merged(name: str, rounds: list[Result]) -> Result:
    """All rounds' requests; throughput is the median round's."""
    out = Result(name)
    for r in rounds:
        out.latencies += r.latencies
        out.ttfts += r.ttfts
    middle = sorted(rounds, key=lambda r: r.tokens_per_second)[len(rounds) // 2]
    out.tokens, out.seconds = middle.tokens, middle.seconds
    return out


async def first_token(client: httpx.AsyncClient, body: dict) -> float:
    """Seconds from sending the request to its first streamed event."""
    started = time.perf_counter()
    async with client.stream("POST", "/generate_stream", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                return time.perf_counter() - started
    raise RuntimeError("no token streamed")


async def schema_ttfts(url: str, tries: int) -> tuple[list[float], list[float], list[float]]:
    """TTFT of free requests, of a new schema each time, and of that schema again, one request at a time."""
    free, new, cached = [], [], []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for i in range(tries):
            schema = {**SCHEMA, "properties": {**SCHEMA["properties"], f"k{uuid.uuid4().hex[:8]}": {"type": "string"}}}
            parameters = {"max_new_tokens": 2}
            body = {"inputs": prompt(i, PROMPT_TOKENS), "parameters": parameters}
            free.append(await first_token(client, body))
            constrained = {**body, "parameters": {**parameters, "grammar": {"type": "json", "value": schema}}}
            new.append(await first_token(client, constrained))
            cached.append(await first_token(client, constrained))
    return free, new, cached


def compile_times(model_dir: Path, tries: int) -> tuple[list[float], list[float]]:
    """Seconds to compile a new schema with the bench model's tokenizer, in this process, and to find it cached."""
    from server.engine.constraints import Grammars, GrammarSpec
    from server.model import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    grammars = Grammars(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))
    grammars.lltokenizer()  # read once per server, at its first compile
    new, cached = [], []
    for _ in range(tries):
        spec = GrammarSpec.json_schema({**SCHEMA, "title": uuid.uuid4().hex})
        for times in (new, cached):
            started = time.perf_counter()
            grammars.compile(spec)
            times.append(time.perf_counter() - started)
    return new, cached


QWEN_VOCAB = 151_936  # Qwen2.5's embedding rows (151,665 tokens)


def qwen_sized_tokenizer(size: int = QWEN_VOCAB - 271, seed: int = 0):
    """A byte-level BPE tokenizer of Qwen2.5's size: the 256 byte symbols and random words (mostly with a leading
    space, as real vocabularies), no merges: llguidance reads only its tokens, which is what the mask costs."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    rng, letters = random.Random(seed), "abcdefghijklmnopqrstuvwxyz" * 2 + 'ABCDEFGHIJ0123456789{}[]":,_-. '
    while len(vocab) < size:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 9))).replace(" ", "Ġ")
        vocab.setdefault(("Ġ" if rng.random() < 0.6 else "") + word, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def mask_costs(rows: int, steps: int, device: str) -> dict[str, list[float]]:
    """Seconds per step to mask `rows` constrained rows (at different places of the JSON schema) over a Qwen-sized
    vocabulary, side by side: (c) as before this change, a mask per row then bits unpacked; (d) mask_constrained:
    llguidance's threads fill every row's mask at once, applied in one pass."""
    import random
    from types import SimpleNamespace

    import torch

    from bench.common import synchronize
    from server.engine.constraints import Grammars, GrammarSpec, fill_masks, mask_constrained

    tokenizer = qwen_sized_tokenizer()
    grammars = Grammars(tokenizer, QWEN_VOCAB, frozenset({tokenizer.eos_token_id}))
    grammar = grammars.compile(GrammarSpec.json_schema(SCHEMA))
    rng, seqs = random.Random(1), []
    for i in range(rows):  # each row some tokens into the schema, walked by random allowed tokens
        constraint = grammar.constraint()
        for _ in range(i % 12):
            (choices,) = mask_constrained([SimpleNamespace(constraint=constraint)], torch.zeros(1, QWEN_VOCAB)).values()
            ids = torch.isfinite(choices[0]).nonzero().flatten().tolist()
            constraint.advance(rng.choice(ids))
        seqs.append(SimpleNamespace(constraint=constraint))
    logits = torch.randn(rows, QWEN_VOCAB, device=device)

    bits = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=device)

    def before() -> None:  # the code this replaced, as it was
        words = (QWEN_VOCAB + 31) // 32
        bitmask = torch.full((rows, words), -1, dtype=torch.int32)
        for i, seq in enumerate(seqs):
            row = bitmask[i]
            seq.constraint.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
        masked = logits[list(range(rows))]
        data = bitmask.to(device).view(torch.uint8)
        allowed = (data[:, :, None] & bits).ne(0).reshape(rows, -1)[:, :QWEN_VOCAB]
        masked.masked_fill_(~allowed, -torch.inf)
        synchronize(device)

    def after() -> None:
        mask_constrained(seqs, logits.clone())  # in place: on a copy, as the step's logits are fresh each step
        synchronize(device)

    def fill() -> None:
        fill_masks([seq.constraint for seq in seqs], QWEN_VOCAB)

    def copy() -> None:
        logits.clone()
        synchronize(device)

    times: dict[str, list[float]] = {
        "(c) row by row, as before": [],
        "(d) batched fill, applied in place": [],
        "    of which llguidance's fill": [],
        "    and the copy of the logits (not in a step)": [],
    }
    for step in range(steps + 2):  # interleaved; the first two are warm-up
        for name, run in zip(times, (before, after, fill, copy), strict=True):
            started = time.perf_counter()
            run()
            if step >= 2:
                times[name].append(time.perf_counter() - started)
    return times


def report_mask_costs(rows: int, steps: int, device: str) -> None:
    times = mask_costs(rows, steps, device)
    print(f"mask cost per step, {rows} rows constrained by the JSON schema, {QWEN_VOCAB} tokens (Qwen2.5), {device}")
    for name, values in times.items():
        print(f"  {name}: median {statistics.median(values) * 1e3:6.2f} ms, min {min(values) * 1e3:6.2f} ms")
    for name, pick in (("median", statistics.median), ("fastest", min)):  # fastest: least disturbed by others
        c, d, fill, copy = (pick(v) for v in times.values())
        print(
            f"{name}: batched / row by row: d/c = {d / c:5.2f}; (d) {(d - copy) * 1e3:.2f} ms per step, of which the"
            f" fill {fill * 1e3:.2f} ms (target <= 1 ms)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3, help="the contenders run interleaved, this many times")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ttft-tries", type=int, default=10)
    parser.add_argument("--workdir", type=Path, help="keep the bench model here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="a small model and load: checks that it runs")
    parser.add_argument("--masks-only", action="store_true", help="only the mask cost per step (no server)")
    parser.add_argument("--mask-rows", type=int, default=16)
    parser.add_argument("--mask-steps", type=int, default=30)
    add_device_arguments(parser)  # where the masks are applied (the logits' device)
    args = parser.parse_args()
    if args.masks_only:
        print(describe_run())
        report_mask_costs(args.mask_rows, args.mask_steps, args.device)
        return
    if args.quick:
        args.requests, args.rounds, args.new_tokens, args.ttft_tries, args.mask_steps = CLIENTS, 1, 8, 2, 2

    print(describe_run())
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, store = build_bench_model(args.workdir or Path(tmp), quick=args.quick)
        shape = "128 x 2 layers (quick)" if args.quick else "512 x 8 layers"
        print(f"bench model: Llama hidden {shape}, float32, CPU, byte tokenizer; adapters: {', '.join(ADAPTERS)}")
        print(
            f"load: {CLIENTS} clients, each its own combination of 1-3 adapters; {PROMPT_TOKENS}-token prompts,"
            f" {args.new_tokens} new tokens, greedy; {args.requests} requests per round, {args.rounds} rounds\n"
        )
        combos = combinations(list(ADAPTERS), CLIENTS, seed=1)
        loads = {
            "(b) all rows free": bodies(combos, set(), args.requests, args.new_tokens),
            "(a) half rows JSON schema": bodies(combos, set(range(0, CLIENTS, 2)), args.requests, args.new_tokens),
        }
        results: dict[str, list[Result]] = {name: [] for name in loads}
        with mixserve(model_dir, store, max_batch_size=CLIENTS) as server:
            if not args.quick:
                for load in loads.values():  # warm-up: loads the adapters, compiles the schema
                    run_load("warm-up", server.url, [b[:1] for b in load])
            for _ in range(args.rounds):
                for name, load in loads.items():
                    results[name].append(run_load(name, server.url, load))
            free, new, cached = asyncio.run(schema_ttfts(server.url, args.ttft_tries))
        for name, rs in results.items():
            print(f"  {name}: " + ", ".join(f"{r.tokens_per_second:.1f}" for r in rs) + " tok/s per round")
        served = {name: merged(name, rs) for name, rs in results.items()}
        print()
        print(HEADER)
        for result in served.values():
            print(result.row())
        print()
        a = served["(a) half rows JSON schema"].tokens_per_second
        b = served["(b) all rows free"].tokens_per_second
        print(f"half constrained / all free: a/b = {a / b:5.2f} (target >= 0.85)")

        def ms(values: list[float]) -> str:
            return f"{statistics.median(values) * 1e3:6.1f} ms"

        print(
            f"TTFT, one request at a time (median of {args.ttft_tries}): free {ms(free)}, new schema (compiled)"
            f" {ms(new)}, same schema again (cached) {ms(cached)}"
        )
        compiled, found = compile_times(model_dir, args.ttft_tries)
        print(f"compiling the schema alone, in-process: new {ms(compiled)}, cached {ms(found)}")
    print()
    report_mask_costs(args.mask_rows, args.mask_steps, args.device)


if __name__ == "__main__":
    main()
