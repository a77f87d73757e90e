"""Every benchmark still runs to the end and prints its ratios (in quick mode: what it measures is not checked,
timings are noise here; that it measures is)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

BENCHMARKS = {
    "throughput": ["(a) mixserve, mixed types", "(c) obvious server, LoRA only", "a/b =", "a/c ="],
    "engine_choice": ["mixserve / transformers"],
    "adapter_load": ["cold load, POST .../load", "host-tier reload", "gap ratio p99 loading / quiet ="],
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One quick bench model and store for all of them (each builds it when missing)."""
    return tmp_path_factory.mktemp("bench")


@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_runs_in_quick_mode_and_prints_its_ratios(script, workdir):
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{script}", "--quick", "--workdir", str(workdir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("mixserve ") and "torch " in lines[0] and " threads" in lines[0], lines[0]
    for expected in BENCHMARKS[script]:
        assert expected in done.stdout, done.stdout
