"""The playground: a page the server serves itself (server/playground/: HTML, CSS and one ES module; no build step,
nothing fetched from elsewhere) to compare combinations side by side as they stream, and GET /operator, the JSON
its operator tab polls.

The page holds no data: all it shows comes from the API, sent with the visitor's key. So `Pages` answers it (and a
browser's GET /, redirected to it) before the API key is checked; every other request passes on unchanged."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from contextlib import asynccontextmanager
from itertools import pairwise
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel
from starlette.routing import Route, Router

from server.api.errors import NATIVE_ERRORS
from server.api.schemas import ErrorResponse
from server.api.serving import state_of, tenant_of
from server.engine.sequence import Sequence
from server.metrics import Metrics

PAGE_DIR = Path(__file__).resolve().parents[1] / "playground"
ASSETS = {  # path -> (file, media type)
    "/playground": ("index.html", "text/html; charset=utf-8"),
    "/playground/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/playground/playground.css": ("playground.css", "text/css; charset=utf-8"),
}
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}
SAMPLE_SECONDS = 5.0
WINDOW_SECONDS = 300.0
MAX_ROWS = 64  # rows listed by /operator; the counts are always complete


class Pages:
    """ASGI middleware, placed outside Authenticate: GET of the page's files, and GET / from a browser (it accepts
    text/html) redirected to /playground. TGI's POST / and GET / from other clients pass on unchanged."""

    def __init__(self, app):
        self.app = app
        routes = [Route(path, _asset((PAGE_DIR / file).read_bytes(), media)) for path, (file, media) in ASSETS.items()]
        self.pages = Router([*routes, Route("/", _to_playground)])

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET" and _public(scope):
            return await self.pages(scope, receive, send)
        await self.app(scope, receive, send)


def _public(scope) -> bool:
    if scope["path"] in ASSETS:
        return True
    return scope["path"] == "/" and b"text/html" in dict(scope["headers"]).get(b"accept", b"")


def _asset(content: bytes, media_type: str):
    async def asset(request) -> Response:
        return Response(content, media_type=media_type, headers=PAGE_HEADERS)

    return asset


async def _to_playground(request) -> RedirectResponse:
    return RedirectResponse("/playground", status_code=307)


class Activity:
    """Adapter loads and evictions per SAMPLE_SECONDS over the last WINDOW_SECONDS, from the metrics' counters."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.samples: deque[tuple[float, float, float, float]] = deque(maxlen=int(WINDOW_SECONDS / SAMPLE_SECONDS))

    def totals(self) -> tuple[float, float, float, float]:
        """(unix time, successful loads, failed loads, evictions) since the server started."""
        loads = {s.labels["outcome"]: s.value for s in _totals(self.metrics.adapter_loads)}
        evictions = sum(s.value for s in _totals(self.metrics.adapter_evictions))
        return time.time(), loads.get("success", 0.0), loads.get("error", 0.0), evictions

    async def sample_forever(self) -> None:
        while True:
            self.samples.append(self.totals())
            await asyncio.sleep(SAMPLE_SECONDS)

    def intervals(self) -> list[Interval]:
        """Oldest first; the last one ends now."""
        points = [*self.samples, self.totals()]
        return [
            Interval(end=b[0], loads=int(b[1] - a[1]), failed_loads=int(b[2] - a[2]), evictions=int(b[3] - a[3]))
            for a, b in pairwise(points)
        ]


def _totals(counter) -> list:
    return [s for m in counter.collect() for s in m.samples if s.name.endswith("_total")]


@asynccontextmanager
async def _sampling(app: FastAPI):
    """Runs inside the app's lifespan (FastAPI merges a router's), once the metrics exist."""
    app.state.activity = activity = Activity(app.state.metrics)
    task = asyncio.create_task(activity.sample_forever())
    try:
        yield
    finally:
        task.cancel()


router = APIRouter(lifespan=_sampling)


class TierUse(BaseModel):
    adapters: int
    bytes: int


class KnownAdapter(BaseModel):
    name: str
    type: str | None
    state: str  # as /adapters says: loaded | host | loading | error (a future tier: its own word)
    bytes: int | None
    running_requests: int | None
    last_used: float | None


class Interval(BaseModel):
    end: float  # unix time
    loads: int
    failed_loads: int
    evictions: int


class Row(BaseModel):
    state: Literal["running", "waiting"]
    adapters: str  # the canonical combination; "" for the base model
    prompt_tokens: int
    generated_tokens: int
    age_s: float


class Operator(BaseModel):
    time: float
    tiers: dict[str, TierUse]  # by state, as /adapters names it: bytes held there
    adapters: list[KnownAdapter]
    interval_s: float
    window_s: float
    activity: list[Interval]
    running: int
    waiting: int
    max_batch_size: int
    max_queue: int
    rows: list[Row]


@router.get(
    "/operator",
    response_model=Operator,
    responses={**NATIVE_ERRORS, 403: {"model": ErrorResponse}},
    summary="What an operator watches: adapters and bytes per tier, loads and evictions lately, the queue and rows",
)
async def operator(request: Request) -> Operator:
    """Read from the server's memory, nothing walks the store. With API keys configured, a key without namespaces:
    the rows and adapters are every tenant's."""
    tenant_of(request).check_unscoped("/operator")
    state = state_of(request)
    engine, registry = state.engine, state.registry
    known = [registry.describe(name) for name in sorted(registry.known())]
    known = [a for a in known if a["state"] != "available"]
    tiers: dict[str, TierUse] = {}
    for entry in known:
        if entry.get("bytes") is not None:
            use = tiers.setdefault(entry["state"], TierUse(adapters=0, bytes=0))
            use.adapters += 1
            use.bytes += entry["bytes"]
    now = time.monotonic()
    running = [_row("running", seq, now) for seq in list(engine.runner.rows)]
    waiting = [_row("waiting", seq, now) for seq in list(engine.scheduler.waiting)]
    return Operator(
        time=time.time(),
        tiers=tiers,
        adapters=[
            KnownAdapter(
                name=a["name"],
                type=a.get("type"),
                state=a["state"],
                bytes=a.get("bytes"),
                running_requests=a.get("running_requests"),
                last_used=a.get("last_used"),
            )
            for a in known
        ],
        interval_s=SAMPLE_SECONDS,
        window_s=WINDOW_SECONDS,
        activity=request.app.state.activity.intervals(),
        running=engine.running,
        waiting=engine.queued,
        max_batch_size=state.settings.max_batch_size,
        max_queue=state.settings.max_queue,
        rows=(running + waiting)[:MAX_ROWS],
    )


def _row(kind: Literal["running", "waiting"], seq: Sequence, now: float) -> Row:
    return Row(
        state=kind,
        adapters=str(seq.request.adapters),
        prompt_tokens=len(seq.request.prompt_ids),
        generated_tokens=len(seq.tokens),
        age_s=round(now - seq.submitted_at, 3),
    )
