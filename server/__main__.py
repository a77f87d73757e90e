"""`python -m server [--port 9000 ...]`: every MIXSERVE_* setting is also a flag."""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic import ValidationError

from server.app import create_app
from server.config import Settings


def main() -> None:
    try:
        settings = Settings(_cli_parse_args=True)
    except ValidationError as exc:
        problems = "\n".join(f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        sys.exit(f"mixserve: invalid settings\n{problems}")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)


if __name__ == "__main__":
    main()
