"""python -m server.demo build [--model-dir DIR] [--adapters-dir DIR]: rebuilds the embedded demo (build.py)."""

import argparse
from pathlib import Path

from server.config import DEMO_MODEL_DIR
from server.demo.build import build

parser = argparse.ArgumentParser(prog="python -m server.demo", description=__doc__)
parser.add_argument("command", choices=["build"])
parser.add_argument("--model-dir", type=Path, default=DEMO_MODEL_DIR, help="where the base model goes")
parser.add_argument("--adapters-dir", type=Path, default=Path("adapters_store"), help="where the adapters go")
args = parser.parse_args()
build(args.model_dir, args.adapters_dir)
