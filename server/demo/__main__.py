"""python -m server.demo build [--model-dir DIR] [--adapters-dir DIR]: rebuilds the embedded demo (build.py)."""

import os

# Before torch loads: the same kernels on every x86-64 CPU with AVX2, so that a rebuild matches the committed files
# bit for bit on machines with AVX-512 too (MKL's conditional numerical reproducibility; ATen's vectorised ops).
os.environ.setdefault("MKL_CBWR", "AVX2")
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from server.config import DEMO_MODEL_DIR  # noqa: E402
from server.demo.build import build  # noqa: E402

parser = argparse.ArgumentParser(prog="python -m server.demo", description=__doc__)
parser.add_argument("command", choices=["build"])
parser.add_argument("--model-dir", type=Path, default=DEMO_MODEL_DIR, help="where the base model goes")
parser.add_argument("--adapters-dir", type=Path, default=Path("adapters_store"), help="where the adapters go")
args = parser.parse_args()
build(args.model_dir, args.adapters_dir)
