"""The GPU check (README, "GPU"): what a device does with mixserve, in one run and one small report.

    python -m bench.gpu_check [--device cuda] [--quick] [--report gpu-check]          (make gpu-check)

Parts, each in a subprocess of its own with its own timeout (a hang or a crash loses that part, not the others):
  device        the device's name, torch's and CUDA's versions
  tests float32 the exactness tests on the device (oracle, batching, weights, precision, families; paged attention
                on a family with windows and one with two kinds of layers): logits and logprobs within 1e-5 of PEFT
                on the same device, rows independent of their batch
  tests bf16    the same but precision (which holds both dtypes itself) with MIXSERVE_TEST_DTYPE=bfloat16: PEFT's
                mixed model in bfloat16 as the reference, at tests/conftest.py's tolerances
  tolerance     the largest |logit - PEFT's| per adapter type (each alone, then all six) on the tests' Llama: ours
                in float32 against PEFT in float32; ours in bfloat16 against PEFT in bfloat16 and in float32; and
                PEFT in bfloat16 against PEFT in float32 (what bfloat16 costs any model)
  mixed_decode  python -m bench.mixed_decode --shape 0.5b --rounds 2 --device DEVICE --dtype bfloat16: decode and
                prefill tok/s with and without adapters, a/b, and the step profile (launches and syncs per decode step)
  decode_attention
                python -m bench.decode_attention --device DEVICE --dtype bfloat16: one layer's decode attention at the
                0.5B shape, 16 rows, longest 128 / 512 / 2048 tokens: gather + SDPA (the default) against the
                server's paged attention (MIXSERVE_PAGED_ATTENTION=on: flex_attention reading the block tables), and
                gather + SDPA under CUDA graphs; µs, ratios, differences, compile s
  compile       python -m bench.compile_step --rounds 1 --device DEVICE --dtype bfloat16: the small shape's decode
                step compiled at best (one composition, fixed shapes; mode reduce-overhead on CUDA: CUDA graphs)
                against eager, without adapters and mixed: compiled/eager, compile time, graphs, differences
Written: REPORT.json (every part: command, exit status, seconds, pytest's counts, its output's tail, the benchmarks'
whole output; the tolerance's and decode_attention's numbers read out) and REPORT.txt (the same, to read). Exit
status 0 when every part passed.

--quick (what the suite runs on the CPU, so that this cannot rot): one test of each file, the tolerance of LoRA
alone, mixed_decode --quick, decode_attention --quick (compiled: a small pool) and compile_step --quick with
torch.compile disabled (TORCH_COMPILE_DISABLE=1: that the part runs and reports, not what compiling does; inductor
takes minutes on a small CPU). The benchmarks share one work directory (the models and adapters they build).
Nothing here installs anything: on a machine without network, its dependencies come from `make gpu-wheels`
(--requirements prints them: what the server and these parts import, less torch and what torch brings).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXACTNESS = [
    "test_oracle.py",
    "test_batching.py",
    "test_decode_step.py",
    "test_weights.py",
    "test_precision.py",
    "test_families.py",
    "test_dora_bias.py",
    "test_embedding_adapters.py",
    "test_quantized.py",
    "test_paged_attention.py::test_each_family_decodes_paged_as_peft[qwen2-window]",
    "test_paged_attention.py::test_each_family_decodes_paged_as_peft[gemma3]",
]
QUICK_TESTS = [  # one of each file: cheap enough for the suite
    "test_oracle.py::test_logits_equal_reference[llama-lora]",
    "test_batching.py::test_same_request_alone_and_in_a_crowd_is_identical",
    "test_weights.py::test_weighted_logits_equal_the_reference[lora@0.5]",
    "test_precision.py::test_oft_at_a_weight_is_its_float32_rotation_cast_once",
    "test_families.py::test_gpt_neo_local_attention_is_refused",
    "test_paged_attention.py::test_each_family_decodes_paged_as_peft[qwen2-window]",
]
# seconds per part; together under the 9 minutes a check may take on one GPU (a lent device runs 10 at most)
TIMEOUTS = {
    "device": 20,
    "tests float32": 170,
    "tests bf16": 65,
    "tolerance": 35,
    "mixed_decode": 85,
    "decode_attention": 75,
    "compile": 90,
}
# what the server, the tests and the benchmarks import beyond the standard library (make gpu-wheels)
IMPORTED = [
    "peft",
    "transformers",
    "safetensors",
    "fastapi",
    "uvicorn",
    "pydantic",
    "pydantic-settings",
    "prometheus-client",
    "llguidance",
    "bitsandbytes",
    "torchao",
    "huggingface_hub",
    "pytest",
    "httpx",
]
DEVICE_INFO = """
import json, platform, torch
device = torch.device({device!r})
info = {{"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}}
if device.type == "cuda":
    properties = torch.cuda.get_device_properties(device)
    info.update(name=properties.name, memory_gib=round(properties.total_memory / 2**30, 1),
                capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                cudnn=torch.backends.cudnn.version(), devices=torch.cuda.device_count())
    torch.ones(1, device=device).add_(1).item()  # the device runs a kernel
else:
    info.update(name=f"{{platform.processor() or platform.machine()}} CPU", threads=torch.get_num_threads())
print(json.dumps(info))
"""


@dataclass
class Part:
    name: str
    command: list[str]
    returncode: int | None = None  # None: timed out
    seconds: float = 0.0
    summary: str = ""  # pytest's last line, or what the part found
    output: str = ""  # mixed_decode's and the device's whole output; the tail of a test run's

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_part(part: Part, timeout: float, env: dict[str, str]) -> Part:
    """Runs part.command in its own process group (killed whole on timeout); fills the outcome in."""
    started = time.monotonic()
    process = subprocess.Popen(
        part.command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        part.returncode = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        output += f"\n[timed out after {timeout:.0f} s]"
    part.seconds = round(time.monotonic() - started, 1)
    lines = [line for line in output.splitlines() if line.strip()]
    if part.command[1:3] == ["-m", "pytest"]:
        counts = [line for line in lines if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", line)]
        part.summary = counts[-1].strip("= ") if counts else "no pytest summary"
        part.output = "\n".join(lines[-60:])
    else:
        part.summary = lines[-1] if lines else ""
        part.output = "\n".join(lines[-200:])
    return part


def parts(device: str, quick: bool, workdir: Path) -> list[Part]:
    python = sys.executable
    tests = QUICK_TESTS if quick else EXACTNESS
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs"]
    on = ["--device", device, "--dtype", "bfloat16"]
    mixed_decode = [python, "-m", "bench.mixed_decode", "--workdir", str(workdir), *on]
    return [
        Part("device", [python, "-c", DEVICE_INFO.format(device=device)]),
        Part("tests float32", [*pytest, *(f"tests/{t}" for t in tests)]),
        Part("tests bf16", [*pytest, *(f"tests/{t}" for t in tests if not t.startswith("test_precision"))]),
        Part("tolerance", [python, "-m", "bench.gpu_check", "--tolerance", *(["--quick"] if quick else [])]),
        Part("mixed_decode", [*mixed_decode, *(["--quick"] if quick else ["--shape", "0.5b", "--rounds", "2"])]),
        Part("decode_attention", [python, "-m", "bench.decode_attention", *on, *(["--quick"] if quick else [])]),
        Part(
            "compile",
            [
                python,
                "-m",
                "bench.compile_step",
                "--workdir",
                str(workdir),
                *on,
                *(["--quick"] if quick else ["--rounds", "1"]),
            ],
        ),
    ]


def environment(part: Part, device: str, quick: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIXSERVE_", "PYTEST_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"  # a part killed at its timeout keeps what it printed
    env["MIXSERVE_TEST_DEVICE"] = device
    env["MIXSERVE_TEST_DTYPE"] = "bfloat16" if part.name == "tests bf16" else "float32"
    if quick and part.name == "compile":
        env["TORCH_COMPILE_DISABLE"] = "1"  # see the module's docstring
    return env


def _last_json(part: Part) -> dict:
    """The last line of part's output that is a JSON object (what the device and tolerance parts print last)."""
    for line in reversed(part.output.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    return {}


ATTENTION_LINE = re.compile(
    r"^\s*(?P<longest>\d+) (?P<name>\(\w\) .+?)\s+(?:failed: (?P<error>.*)|(?P<us>[\d.]+)\s+(?P<ratio>[\d.]+)"
    r"\s+(?P<diff>\S+)\s+(?P<setup>\d+)\s+(?P<first>\S+))$"
)


def attention_table(output: str) -> dict[int, dict[str, dict]]:
    """{longest: {contender: {"us", "ratio", "diff", "first_s"} or {"error"}}} from bench.decode_attention's table."""
    found: dict[int, dict[str, dict]] = {}
    for line in output.splitlines():
        match = ATTENTION_LINE.match(line)
        if not match:
            continue
        row = found.setdefault(int(match["longest"]), {})
        if match["error"] is not None:
            row[match["name"]] = {"error": match["error"]}
            continue
        first = None if match["first"] == "-" else float(match["first"])
        row[match["name"]] = {
            "us": float(match["us"]),
            "ratio": float(match["ratio"]),
            "diff": float(match["diff"]),
            "first_s": first,
        }
    return found


def text_report(found: list[Part], device: str) -> str:
    lines = [f"mixserve GPU check on {device}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"]
    for part in found:
        status = "ok" if part.ok else ("TIMED OUT" if part.returncode is None else f"FAILED ({part.returncode})")
        lines.append(f"\n== {part.name}: {status} in {part.seconds:.0f} s: {part.summary}")
        lines.append("$ " + " ".join(part.command if part.name != "device" else part.command[:2] + ["..."]))
        lines.append(part.output)
    return "\n".join(lines) + "\n"


def tolerance(quick: bool) -> dict[str, dict[str, float]]:
    """See the module's docstring ("tolerance"); on MIXSERVE_TEST_DEVICE, as the tests place models."""
    import torch

    from server.adapters.store import AdapterStore
    from server.engine.runner import ModelRunner
    from server.model import encode_prompt, load_tokenizer
    from tests.builders import ADAPTERS, build_base, build_store
    from tests.conftest import private_model, set_exact_numerics
    from tests.reference import reference_logits

    set_exact_numerics()
    singles = ["lora"] if quick else list(ADAPTERS)
    mixes = {name: [name] for name in singles} | ({} if quick else {"all six": list(ADAPTERS)})
    dtypes = (torch.float32, torch.bfloat16)
    found: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_base(Path(tmp) / "tiny-llama", "llama")
        store = build_store(model_dir, Path(tmp) / "store")
        ids = encode_prompt(load_tokenizer(model_dir), "The quick brown fox jumps over the lazy dog.")
        ours = {}
        for dtype in dtypes:
            model, registry = private_model(model_dir, AdapterStore(store), dtype)
            runner = ModelRunner(model, registry.context)
            for key, names in mixes.items():
                slots = tuple(a.slot for a in registry.load_blocking(names))
                ours[dtype, key] = runner.score(torch.tensor([ids]), [slots])[0].float().cpu()
            registry.close()
        for key, names in mixes.items():
            peft = {d: reference_logits(model_dir, store, names, ids, d).float() for d in dtypes}
            pairs = {
                "fp32 - PEFT fp32": (ours[torch.float32, key], peft[torch.float32]),
                "bf16 - PEFT bf16": (ours[torch.bfloat16, key], peft[torch.bfloat16]),
                "bf16 - PEFT fp32": (ours[torch.bfloat16, key], peft[torch.float32]),
                "PEFT bf16 - PEFT fp32": (peft[torch.bfloat16], peft[torch.float32]),
            }
            found[key] = {label: float((a - b).abs().max()) for label, (a, b) in pairs.items()}
    return found


def requirements() -> list[str]:
    """name==version of what IMPORTED needs here, but torch (the GPU machine's own) and what only torch needs."""
    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    todo = [Requirement(r) for r in IMPORTED]
    while todo:
        requirement = todo.pop()
        key = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if key in found or key == "torch":
            continue
        try:
            dist = importlib.metadata.distribution(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional one not installed here: not needed here either
        found[key] = dist.version
        for line in dist.requires or []:
            needed = Requirement(line)
            if not needed.marker or any(needed.marker.evaluate({"extra": e}) for e in requirement.extras or [""]):
                todo.append(needed)
    return [f"{name}=={version}" for name, version in sorted(found.items())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="a few tests and mixed_decode --quick (the suite's)")
    parser.add_argument("--report", type=Path, default=REPO / "gpu-check", help="writes REPORT.json and REPORT.txt")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="every part's timeout times this")
    parser.add_argument("--requirements", action="store_true", help="print what make gpu-wheels downloads; exit")
    parser.add_argument("--tolerance", action="store_true", help="the tolerance part alone (on MIXSERVE_TEST_DEVICE)")
    args = parser.parse_args(argv)
    if args.requirements:
        print("\n".join(requirements()))
        return 0
    if args.tolerance:
        found = tolerance(args.quick)
        labels = list(next(iter(found.values())))
        print("max |logit difference|  " + "  ".join(f"{label:>21s}" for label in labels))
        for key, row in found.items():
            print(f"{key[:22]:22s}  " + "  ".join(f"{row[label]:21.2e}" for label in labels))
        print(json.dumps(found))
        return 0
    found = []
    with tempfile.TemporaryDirectory() as workdir:
        for part in parts(args.device, args.quick, Path(workdir)):
            env = environment(part, args.device, args.quick)
            run_part(part, TIMEOUTS[part.name] * args.timeout_scale, env)
            if "TORCH_COMPILE_DISABLE" in env:
                part.output = "[--quick: run with TORCH_COMPILE_DISABLE=1, compiling nothing]\n" + part.output
            print(f"{part.name}: {'ok' if part.ok else 'FAILED'} in {part.seconds:.0f} s: {part.summary}", flush=True)
            found.append(part)
    named = {part.name: part for part in found}
    info = _last_json(named["device"])
    measured = {
        "tolerance": _last_json(named["tolerance"]),
        "decode_attention": attention_table(named["decode_attention"].output),
    }
    report = {"device": args.device, **info, **measured, "quick": args.quick, "parts": [asdict(p) for p in found]}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.report.with_suffix(".txt").write_text(text_report(found, info.get("name", args.device)))
    print(f"report: {args.report.with_suffix('.json')} and .txt")
    return 0 if all(p.ok for p in found) else 1


if __name__ == "__main__":
    sys.exit(main())
