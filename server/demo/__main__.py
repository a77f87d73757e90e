import sys

from server.demo.build import build

if sys.argv[1:] != ["build"]:
    sys.exit("usage: python -m server.demo build")
build()
