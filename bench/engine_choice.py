"""Why mixserve runs its own batching loop: transformers' continuous batching and its plain batched greedy loop
against mixserve's engine.

    python -m bench.engine_choice [--shape bench|small|0.5b] [--device cuda --dtype bfloat16]   (make bench-engine)

All three generate the same greedy requests (32-token prompts, 32 new tokens; 128 requests, 32 at the 0.5b shape)
on the same base model, in this process, without HTTP and without adapters: the batching machinery alone.
transformers' generate_batch (paged attention, its own scheduler) has no hook for per-request adapters either;
this measures whether it would be worth adding one. generate() on 16 prompts at a time (all the same length, so no
padding) is the plain loop. Shapes: the throughput bench's model (bench), or bench.mixed_decode's (small, 0.5b).
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

from bench import mixed_decode
from bench.common import add_device_arguments, build_bench_model, describe_run, prompt, synchronize
from server.adapters.combination import Combination
from server.config import Settings
from server.engine.sampling import SamplingParams
from server.engine.sequence import GenerationRequest
from server.model import encode_prompt
from server.state import ServerState

NEW_TOKENS = 32


def transformers_cb(model_dir: Path, prompts: list[list[int]], batch: int, on: dict, quick: bool = False) -> float:
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="paged|sdpa", dtype=getattr(torch, on["dtype"])
    ).to(on["device"])
    model.eval()
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
    synchronize(on["device"])
    started = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=batching)
    synchronize(on["device"])
    seconds = time.perf_counter() - started
    return sum(len(o.generated_tokens) for o in outputs.values()) / seconds


def transformers_loop(model_dir: Path, prompts: list[list[int]], batch: int, on: dict, quick: bool = False) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, on["dtype"])).to(on["device"])
    model.eval()
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)
    chunks = [torch.tensor(prompts[i : i + batch], device=on["device"]) for i in range(0, len(prompts), batch)]
    with torch.inference_mode():
        if not quick:
            model.generate(chunks[0], generation_config=config)
        synchronize(on["device"])
        started = time.perf_counter()
        tokens = sum(model.generate(ids, generation_config=config)[:, ids.shape[1] :].numel() for ids in chunks)
        synchronize(on["device"])
    return tokens / (time.perf_counter() - started)


def mixserve_engine(model_dir: Path, store: Path, prompts: list[list[int]], batch: int, on: dict) -> float:
    state = ServerState.start(Settings(model=str(model_dir), adapters_dir=store, **on, max_batch_size=batch))

    async def run(chunk: list[list[int]]) -> int:
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)  # as the transformers contenders
        handles = [
            state.engine.submit(GenerationRequest(str(i), p, Combination(), params)) for i, p in enumerate(chunk)
        ]
        return sum([len((await h.result()).tokens) for h in handles])

    try:
        asyncio.run(run(prompts[:batch]))
        synchronize(on["device"])
        started = time.perf_counter()
        tokens = asyncio.run(run(prompts))  # sampled tokens reach the host: the device's work is done
        return tokens / (time.perf_counter() - started)
    finally:
        state.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["bench", "small", "0.5b"], default="bench")
    parser.add_argument("--requests", type=int, help="default: 128, or 32 at the 0.5b shape")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--quick", action="store_true", help="a small model and load: checks that it runs")
    add_device_arguments(parser)
    args = parser.parse_args()
    on = {"device": args.device, "dtype": args.dtype}
    if args.quick:
        args.shape, args.requests, args.batch, args.rounds = "bench", 4, 4, 1
    requests = args.requests or (32 if args.shape == "0.5b" else 128)
    print(describe_run(args.device, args.dtype))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        if args.shape == "bench":
            model_dir, store = build_bench_model(root, quick=args.quick)
        else:
            model_dir, store = mixed_decode.build(root, args.shape)
        tokenizer = ByT5Tokenizer.from_pretrained(model_dir)
        prompts = [encode_prompt(tokenizer, prompt(i)) for i in range(requests)]
        torch.manual_seed(0)
        contenders = {
            "transformers generate_batch": lambda: transformers_cb(model_dir, prompts, args.batch, on, args.quick),
            "transformers generate loop": lambda: transformers_loop(model_dir, prompts, args.batch, on, args.quick),
            "mixserve engine": lambda: mixserve_engine(model_dir, store, prompts, args.batch, on),
        }
        rounds: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, run in contenders.items():
                rounds[name].append(run())
        print(
            f"model {args.shape}: {requests} requests, {len(prompts[0])}-token prompts, {NEW_TOKENS} new tokens,"
            f" batch {args.batch}"
        )
        for name, values in rounds.items():
            print(
                f"{name:28s} {statistics.median(values):7.1f} tok/s  (rounds: {', '.join(f'{t:.1f}' for t in values)})"
            )
        ours = statistics.median(rounds["mixserve engine"])
        against = {
            "mixserve / transformers": "transformers generate_batch",
            "mixserve / generate loop": "transformers generate loop",
        }
        for label, name in against.items():
            theirs = statistics.median(rounds[name])
            print(f"{label:28s} {ours / theirs:7.2f}   ({ours:.1f} / {theirs:.1f} tok/s)")


if __name__ == "__main__":
    main()
