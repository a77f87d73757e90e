"""make gpu-check (bench/gpu_check.py) on the CPU in quick mode, so that the script a GPU session runs cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

from bench import gpu_check
from tests.conftest import REPO


def test_the_check_runs_each_part_and_writes_its_report(tmp_path):
    report = tmp_path / "check"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick", "--report", str(report)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    found = json.loads(report.with_suffix(".json").read_text())
    text = report.with_suffix(".txt").read_text()
    assert done.returncode == 0, done.stdout + done.stderr + text
    parts = {part["name"]: part for part in found["parts"]}
    assert list(parts) == [
        "device",
        "tests float32",
        "tests bf16",
        "tolerance",
        "mixed_decode",
        "decode_attention",
        "compile",
    ]
    assert found["torch"] and found["name"] and found["device"] == "cpu"
    for name in ("tests float32", "tests bf16"):
        assert "passed" in parts[name]["summary"] and "failed" not in parts[name]["summary"], parts[name]
    assert found["tolerance"]["lora"]["fp32 - PEFT fp32"] <= 1e-5  # float32's contract, measured
    assert 0 < found["tolerance"]["lora"]["PEFT bf16 - PEFT fp32"] < 1  # what bfloat16 costs, measured
    assert "--dtype bfloat16" in " ".join(parts["mixed_decode"]["command"])
    assert "(a) mixed types" in parts["mixed_decode"]["output"] and "(a) mixed types" in text
    attention = found["decode_attention"]
    assert attention and "--dtype bfloat16" in " ".join(parts["decode_attention"]["command"])
    for contenders in attention.values():  # the same attention, in bfloat16 on both sides
        assert set(contenders) == {"(a) gather + SDPA", "(b) paged"}, contenders
        assert contenders["(b) paged"]["diff"] < 0.05
    compiled = parts["compile"]
    assert "bench.compile_step" in compiled["command"] and "TORCH_COMPILE_DISABLE=1" in compiled["output"]
    assert "mixed types, compiled" in compiled["output"], compiled["output"]


def test_the_attention_table_is_read_from_the_bench_output_failures_included():
    output = """decode attention, one layer: 16 rows, ...
longest contender           median us  / (a)  max |diff|  setup us    first s
    128 (a) gather + SDPA       248.9   1.00    0.00e+00        31          -
    128 (b) paged               406.7   1.63    5.96e-07        77        6.5
   2048 (b) paged          failed: InductorError: CppCompileError: C++ compile error
"""
    assert gpu_check.attention_table(output) == {
        128: {
            "(a) gather + SDPA": {"us": 248.9, "ratio": 1.0, "diff": 0.0, "first_s": None},
            "(b) paged": {"us": 406.7, "ratio": 1.63, "diff": 5.96e-07, "first_s": 6.5},
        },
        2048: {"(b) paged": {"error": "InductorError: CppCompileError: C++ compile error"}},
    }


def test_a_part_that_hangs_is_killed_at_its_timeout_and_the_check_goes_on():
    part = gpu_check.Part("hang", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(600)"])
    gpu_check.run_part(part, timeout=1, env={})
    assert part.returncode is None and not part.ok and "timed out after 1 s" in part.output


def test_the_wheels_are_what_the_server_and_the_tests_import_but_never_torch():
    wanted = gpu_check.requirements()
    names = {line.split("==")[0] for line in wanted}
    assert {"peft", "transformers", "fastapi", "uvicorn", "pytest", "httpx", "safetensors"} <= names
    assert "torch" not in names and not any(n.startswith(("nvidia-", "triton")) for n in names)
    assert "peft==0.21.2" in wanted  # the pins the exactness tests are held to
