"""Device errors that no request caused (a device-side assert, an illegal address, an ECC error): CUDA reports them
at the next synchronisation, possibly in another request's step, and the process's CUDA context is unusable after
them. The replica says so (/health and /ready fail), fails every request it holds with 503, and exits so that its
orchestrator replaces it. Out of memory is not one of them: it stays the failure of the requests that met it.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

EXIT_CODE = 70  # EX_SOFTWARE: not a clean stop, so that the orchestrator restarts the replica
GRACE_SECONDS = 2.0  # for the 503s already sent to reach their clients before the process ends


# How a broken CUDA context shows in an error's text when the library that met it first is not CUDA's runtime: a
# GEMM (cuBLAS), a convolution (cuDNN), a Triton kernel (torch.compile, flex_attention), the driver.
DEVICE_FAILURES = (
    "CUDA error",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUBLAS_STATUS_INTERNAL_ERROR",
    "cuDNN error",
    "Triton Error [CUDA]",
    "CUDA driver error",
    "illegal memory access",
    "unspecified launch failure",
    "device-side assert",
)


def device_fatal(exc: BaseException) -> bool:
    """Whether exc is a device error after which this process cannot compute anything more."""
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises CUDA errors as this
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and any(failure in str(exc) for failure in DEVICE_FAILURES)


def raise_if_device_fatal(exc: BaseException) -> None:
    """Where a failure would be pinned on requests: a device error is no request's, and goes up to the engine."""
    if device_fatal(exc):
        raise exc


def exit_soon() -> None:
    """Ends the process GRACE_SECONDS from now, without the orderly shutdown (which would touch the device)."""

    def end() -> None:
        time.sleep(GRACE_SECONDS)
        logging.shutdown()
        os._exit(EXIT_CODE)

    threading.Thread(target=end, name="mixserve-exit", daemon=True).start()
