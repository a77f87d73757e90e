"""What scoring a prompt costs, as lm-evaluation-harness asks for it (echo, logprobs: k, max_tokens 1), in-process
on the engine's passes: (a) the scoring pass with the prompt tokens' logprobs only, (b) the same with the top-k at
every position (one top-k over the prompt's logits), (e) that top-k alone, side by side; and a one-token request with
prompt logprobs,
(c) as served now (its token from the scoring pass's last logits) against (d) the scoring pass then a prefill (as
before issue 34, and as a request for more tokens still does). For the bench model's byte vocabulary and for a
32,000-token one (Llama 2's), where the head and the top-k weigh more.

    python -m bench.prompt_scoring [--quick] [--tokens 2048] [--k 5] [--device cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import ByT5Tokenizer, LlamaForCausalLM

from bench.common import add_device_arguments, describe_run, device_name, synchronize
from server.adapters.combination import Combination
from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterStore
from server.demo import tiny
from server.engine.passes import IsolatedPasses
from server.engine.runner import ModelRunner
from server.engine.sampling import SamplingParams, TokenChooser
from server.engine.sequence import EventOutbox, GenerationRequest, Sequence

TOKENIZER = ByT5Tokenizer()


def runner_for(vocab: int, quick: bool, device: torch.device, dtype: torch.dtype, store: Path) -> ModelRunner:
    torch.manual_seed(0)
    sizes = dict(hidden=128, intermediate=384, layers=2, heads=4, kv_heads=4) if quick else {}
    config = tiny.config(
        **(sizes or dict(hidden=512, intermediate=1376, layers=8, heads=8, kv_heads=8)), positions=4096
    )
    config.vocab_size = vocab
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    registry = AdapterRegistry(model, AdapterStore(store), device, dtype)
    return ModelRunner(model, registry.context, default_cache_tokens=8192)


def sequence(prompt: list[int], k: int, new_tokens: int, device, loop) -> Sequence:
    params = SamplingParams(max_new_tokens=new_tokens, top_logprobs=k, prompt_logprobs=True)
    request = GenerationRequest("bench", prompt, Combination(()), params)
    return Sequence(request, TokenChooser(params, device), TOKENIZER, frozenset(), asyncio.Queue(), EventOutbox(loop))


def timed(contenders: dict[str, object], device, repeats: int) -> dict[str, float]:
    """Median seconds of each contender, run in turns (round after round) so that other load on the machine falls
    on all of them alike: on a GPU wall time, on the CPU the process's CPU time (what a shared machine's other
    processes disturb least)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(repeats + 1):  # the first round warms up
        for name, fn in contenders.items():
            synchronize(device)
            start = clock()
            fn()
            synchronize(device)
            if round_:
                times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and prompt: checks that it runs")
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length")
    parser.add_argument("--k", type=int, default=5, help="top logprobs per position")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="unused (the suite passes it to every benchmark)")
    add_device_arguments(parser)
    args = parser.parse_args()
    tokens, repeats = (128, 2) if args.quick else (args.tokens, args.repeats)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    loop = asyncio.new_event_loop()
    print(describe_run())
    clock = "wall time" if device.type == "cuda" else "CPU time"
    print(f"{device_name(device)}, {args.dtype}; prompt of {tokens} tokens, top-{args.k}; {clock}, median of {repeats}")
    with tempfile.TemporaryDirectory() as store:
        for vocab in (384, 32000):
            runner = runner_for(vocab, args.quick, device, dtype, Path(store))
            passes = IsolatedPasses(runner, fail=_raise, end=lambda seq: None, choosable=vocab)
            prompt = [(7 * i + 11) % (vocab - 3) + 3 for i in range(tokens)]

            def score(k: int):
                return lambda: passes._score([sequence(prompt, k, 1, device, loop)])

            def request(new_tokens: int):
                def run():
                    seqs, _ = passes.prefill([sequence(prompt, args.k, new_tokens, device, loop)])
                    for seq in seqs:
                        runner.release(seq)

                return run

            logprobs = torch.log_softmax(torch.randn(tokens - 1, vocab, device=device), dim=-1)
            contenders = {"a": score(0), "b": score(args.k), "c": request(1), "d": request(2)}
            measured = timed({**contenders, "e": lambda: logprobs.topk(args.k)}, device, repeats)
            a, b, c, d, e = (measured[name] for name in "abcde")
            print(f"vocabulary {vocab}:")
            print(f"  (a) scoring pass, logprobs only      {a * 1000:9.1f} ms")
            print(f"  (b) scoring pass with top-{args.k:<2}         {b * 1000:9.1f} ms   b/a = {b / a:.3f}")
            print(f"  (e) the top-{args.k:<2} alone                 {e * 1000:9.1f} ms   e/a = {e / a:.3f}")
            print(f"  (c) one-token request, one pass      {c * 1000:9.1f} ms")
            print(f"  (d) scoring pass + prefill           {d * 1000:9.1f} ms   d/c = {d / c:.3f}")


def _raise(seq, exc):
    raise exc


if __name__ == "__main__":
    main()
