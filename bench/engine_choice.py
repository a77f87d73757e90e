"""Why mixserve runs its own batching loop: transformers' continuous batching against mixserve's engine.

    python -m bench.engine_choice        (make bench-engine)

Both generate the same 128 greedy requests (32-token prompts, 32 new tokens) on the throughput bench's base model,
in this process, without HTTP and without adapters: the batching machinery alone. transformers' generate_batch
(paged attention, its own scheduler) has no hook for per-request adapters either; this measures whether it would
be worth adding one.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, ByT5Tokenizer, ContinuousBatchingConfig, GenerationConfig

from bench.common import build_bench_model, describe_run, prompt
from server.adapters.combination import Combination
from server.config import Settings
from server.engine.sampling import SamplingParams
from server.engine.sequence import GenerationRequest
from server.model import encode_prompt
from server.state import ServerState

NEW_TOKENS = 32


def transformers_cb(model_dir: Path, prompts: list[list[int]], batch: int, quick: bool = False) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="paged|sdpa").eval()
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # sized for this load: by default the cache and its static tensors are sized by free memory (seconds to fill)
    batching = ContinuousBatchingConfig(
        num_blocks=64 if quick else 1024,
        page_size=32,
        max_batch_tokens=batch * len(prompts[0]),
        max_requests_per_batch=batch,
    )
    if not quick:
        model.generate_batch(inputs=prompts[:batch], generation_config=config, continuous_batching_config=batching)
    started = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=batching)
    seconds = time.perf_counter() - started
    return sum(len(o.generated_tokens) for o in outputs.values()) / seconds


def mixserve_engine(model_dir: Path, store: Path, prompts: list[list[int]], batch: int) -> float:
    state = ServerState.start(
        Settings(model=str(model_dir), adapters_dir=store, device="cpu", dtype="float32", max_batch_size=batch)
    )

    async def run(chunk: list[list[int]]) -> int:
        params = SamplingParams(max_new_tokens=NEW_TOKENS)
        handles = [
            state.engine.submit(GenerationRequest(str(i), p, Combination(), params)) for i, p in enumerate(chunk)
        ]
        return sum([len((await h.result()).tokens) for h in handles])

    try:
        asyncio.run(run(prompts[:batch]))
        started = time.perf_counter()
        tokens = asyncio.run(run(prompts))
        return tokens / (time.perf_counter() - started)
    finally:
        state.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--quick", action="store_true", help="a small model and load: checks that it runs")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.batch, args.rounds = 4, 4, 1
    print(describe_run())
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, store = build_bench_model(args.workdir or Path(tmp), quick=args.quick)
        tokenizer = ByT5Tokenizer.from_pretrained(model_dir)
        prompts = [encode_prompt(tokenizer, prompt(i)) for i in range(args.requests)]
        torch.manual_seed(0)
        ours, theirs = [], []
        for _ in range(args.rounds):
            theirs.append(transformers_cb(model_dir, prompts, args.batch, args.quick))
            ours.append(mixserve_engine(model_dir, store, prompts, args.batch))
        print(f"{args.requests} requests, {len(prompts[0])}-token prompts, {NEW_TOKENS} new tokens, batch {args.batch}")
        print(
            f"transformers generate_batch  {statistics.median(theirs):7.1f} tok/s  (rounds: "
            + ", ".join(f"{t:.1f}" for t in theirs)
            + ")"
        )
        print(
            f"mixserve engine              {statistics.median(ours):7.1f} tok/s  (rounds: "
            + ", ".join(f"{t:.1f}" for t in ours)
            + ")"
        )
        print(f"mixserve / transformers      {statistics.median(ours) / statistics.median(theirs):7.2f}")


if __name__ == "__main__":
    main()
