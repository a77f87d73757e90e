"""Errors a client can act on. Each maps to one HTTP status and TGI's `{"error", "error_type"}` body."""


class MixserveError(Exception):
    status_code = 500
    error_type = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ValidationError(MixserveError):
    status_code = 422
    error_type = "validation"


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
