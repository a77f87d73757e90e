"""Every benchmark still runs to the end and prints its ratios (in quick mode: what it measures is not checked,
timings are noise here; that it measures is). The three run at once, on one quick model built first."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.common import build_bench_model
from bench.gpu_check import attention_table
from tests.conftest import REPO

BENCHMARKS = {
    "throughput": [
        "(a) mixserve, mixed types",
        "(c) obvious server, LoRA only",
        "a/b =",
        "a/c =",
        "weighted / unweighted =",
    ],
    "engine_choice": ["mixserve / transformers"],
    "adapter_load": ["cold load, POST .../load", "host-tier reload", "gap ratio p99 loading / quiet ="],
    "mixed_decode": ["(a) mixed types", "(a) LoRA only", "ideal", "bytes", "unloading one of the 16 idle adapters"],
    "dora": ["(a) 4 DoRA rows", "a/b (4 DoRA rows", "c/d (a DoRA row"],
    "module_adapters": ["(a) 15 + head copy", "(c) 16 head copies", "ms/step over b"],
    "prompt_scoring": ["(b) scoring pass with top-5", "b/a =", "d/c ="],
    "structured": ["(a) half rows JSON schema", "a/b =", "new schema (compiled)", "(cached)", "d/c ="],
    "decode_attention": ["(a) gather + SDPA", "(b) paged", "max |diff|"],
    "kv_cache": [
        "one block per running row",
        "new/old",
        "answered 32/32",
        "gathered blocks (ours)",
        "TTFT p50 off/on",
        "answers the same: True",
    ],
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    workdir = tmp_path_factory.mktemp("bench")
    build_bench_model(workdir, quick=True)  # shared: built once, before they start
    running = {
        script: subprocess.Popen(
            [sys.executable, "-m", f"bench.{script}", "--quick", "--workdir", str(workdir)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},  # four at once on few cores: one thread each
        )
        for script in BENCHMARKS
    }
    done = {}
    for script, process in running.items():
        try:
            stdout, stderr = process.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for other in running.values():
                other.kill()
            raise
        done[script] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return done


@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_runs_in_quick_mode_and_prints_its_ratios(script, outputs):
    done = outputs[script]
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("mixserve ") and "torch " in lines[0] and " threads" in lines[0], lines[0]
    for expected in BENCHMARKS[script]:
        assert expected in done.stdout, done.stdout


def test_decode_attention_contenders_compute_the_same_attention(outputs):
    """The server's paged attention (compiled) against its gather + SDPA, float32."""
    table = attention_table(outputs["decode_attention"].stdout)
    assert table, outputs["decode_attention"].stdout
    for contenders in table.values():
        assert contenders["(b) paged"]["diff"] <= 1e-5, contenders
