"""Errors a client can act on. Each maps to one HTTP status and TGI's `{"error", "error_type"}` body."""

import logging


class MixserveError(Exception):
    status_code = 500
    error_type = "internal"
    headers: dict[str, str] | None = None
    expected = False  # a 5xx that is not a fault (draining): logged at INFO, as 4xx are

    @property
    def log_level(self) -> int:
        return logging.ERROR if self.status_code >= 500 and not self.expected else logging.INFO

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ValidationError(MixserveError):
    status_code = 422
    error_type = "validation"


class CacheTooSmall(ValidationError):
    """A request longer than the whole KV cache holds (MIXSERVE_KV_CACHE_MEMORY)."""

    def __init__(self, tokens: int, capacity: int):
        super().__init__(
            f"the request needs {tokens} tokens of KV cache; the cache holds {capacity} (MIXSERVE_KV_CACHE_MEMORY)"
        )


class AdapterNotFound(MixserveError):
    status_code = 404
    error_type = "adapter_not_found"


class AdapterInvalid(MixserveError):
    """The adapter exists but cannot be served: unreadable files, unsupported type, or it does not fit the base."""

    status_code = 422
    error_type = "adapter_invalid"

    def __init__(self, name: str, reason: str):
        super().__init__(f"adapter {name!r}: {reason}")
        self.name = name


class AdapterLoadFailed(MixserveError):
    """Loading an adapter failed (unreadable, incomplete, or not fitting the base); a later request retries."""

    status_code = 424
    error_type = "adapter_load"


class AdapterOutOfMemory(MixserveError):
    """The device had no memory for an adapter even after evicting idle ones."""

    status_code = 503
    error_type = "out_of_memory"
    headers = {"Retry-After": "1"}


class AdapterBusy(MixserveError):
    status_code = 409
    error_type = "adapter_in_use"


class Overloaded(MixserveError):
    status_code = 429
    error_type = "overloaded"
    headers = {"Retry-After": "1"}


class ShuttingDown(MixserveError):
    status_code = 503
    error_type = "unavailable"
    headers = {"Retry-After": "5"}
    expected = True


class NotReady(MixserveError):
    status_code = 503
    error_type = "unavailable"
    headers = {"Retry-After": "5"}


class Draining(MixserveError):
    """/ready while draining: 404 is what a balancer's `disable-on-404` reads as "no new requests, keep the rest"."""

    status_code = 404
    error_type = "unavailable"


class RequestTimeout(MixserveError):
    status_code = 408
    error_type = "timeout"


class ClientDisconnected(MixserveError):
    status_code = 499
    error_type = "client_closed_request"
