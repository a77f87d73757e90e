"""`python -m server [--port 9000 ...]`: every MIXSERVE_* setting is also a flag."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError
from uvicorn.config import STARTUP_FAILURE

from server.api.middleware import drain
from server.app import create_app
from server.config import Settings
from server.engine.attention import UnsupportedModel
from server.metrics import Metrics
from server.quantization import QuantizationError
from server.state import ServerState

# what a model or a setting the server cannot start with raises (its message names the reason and the remedy)
START_ERRORS = (QuantizationError, UnsupportedModel)


def main() -> None:
    try:
        settings = Settings(_cli_parse_args=True)
    except ValidationError as exc:
        problems = "\n".join(f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        sys.exit(f"mixserve: invalid settings\n{problems}")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sockets = None
    if settings.listen_fd is not None:
        try:
            sockets = [socket.socket(fileno=settings.listen_fd)]
        except OSError as exc:
            sys.exit(f"mixserve: cannot start: MIXSERVE_LISTEN_FD={settings.listen_fd} is not an open socket ({exc})")
        settings.host, settings.port = sockets[0].getsockname()[:2]
    metrics = Metrics()
    try:
        state = ServerState.start(settings, metrics)
    except START_ERRORS as exc:  # the message says why and what to change: no traceback
        print(f"mixserve: cannot start: {exc}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    app = create_app(settings, (state, metrics))
    # keep-alive longer than a load balancer keeps idle connections (HAProxy: closed within a few seconds)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_keep_alive=75
    )
    DrainingServer(config, app, settings.drain_seconds).run(sockets)


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM (or SIGINT): drain, then stop and exit 0; on a second one: stop now."""

    def __init__(self, config: uvicorn.Config, app, drain_seconds: float):
        super().__init__(config)
        self.app, self.drain_seconds = app, drain_seconds
        self.draining = False

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining:
            self.force_exit = self.should_exit
            self.should_exit = True
            return
        self.draining = True
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain_then_exit()))

    async def _drain_then_exit(self) -> None:
        await drain(self.app, self.drain_seconds)
        self.should_exit = True


if __name__ == "__main__":
    main()
