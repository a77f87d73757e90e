"""The host tier's copies: an evicted adapter's weights in host memory, in one pinned buffer when they leave a GPU.

One buffer per adapter, not one per tensor: PyTorch's caching host allocator rounds every pinned block up to a power
of two and keeps freed blocks cached, and a LoRA has hundreds of small tensors. The copy off the device goes into
memory pinned before it starts, asynchronously, and records an event; whatever reads the copy waits for that event
first (`HostCopy.wait`). A copy counts the bytes it pins as allocated, rounded as the allocator rounds them: that is
what MIXSERVE_HOST_CACHE bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALIGNMENT = 64  # bytes: each tensor's offset in the buffer, so that a view of any dtype is aligned


def pinned_bytes(nbytes: int) -> int:
    """Host memory that pinning nbytes takes: the caching host allocator's block, the next power of two."""
    return 1 << max(nbytes - 1, 0).bit_length()


def footprint(tensors: list[torch.Tensor], pin: bool) -> int:
    """Host memory that copy_to_host(tensors, pin) holds."""
    packed = sum(_aligned(t) for t in tensors)
    return pinned_bytes(packed) if pin else packed


@dataclass(eq=False)
class HostCopy:
    buffer: torch.Tensor  # uint8 [bytes]: every tensor of the copy is a view of it
    event: object | None  # a torch.cuda.Event recorded after the copies into buffer; None once they are done
    nbytes: int  # host memory held, as allocated

    def wait(self) -> None:
        """Until the copies into the buffer are done (before reading it)."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None


def copy_to_host(tensors: list[torch.Tensor], pin: bool) -> tuple[HostCopy, dict[int, torch.Tensor]]:
    """The tensors copied into one host buffer (pinned, asynchronously, when pin): the copy and, by id of each
    tensor, its view there."""
    buffer = _allocate(sum(_aligned(t) for t in tensors), pin)
    views, offset = {}, 0
    for tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        view = buffer[offset : offset + size].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor, non_blocking=pin)
        views[id(tensor)] = view
        offset += _aligned(tensor)
    return HostCopy(buffer, _recorded_event() if pin else None, footprint(tensors, pin)), views


def release_cached() -> None:
    """Pinned blocks that no copy holds any more go back to the system (PyTorch keeps them cached otherwise: the
    host tier would keep pinning what it dropped): torch.accelerator's call, or on an older torch its private one."""
    if not torch.cuda.is_available():
        return
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    empty = empty or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def _aligned(tensor: torch.Tensor) -> int:
    return -(-tensor.numel() * tensor.element_size() // ALIGNMENT) * ALIGNMENT


def _allocate(nbytes: int, pin: bool) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def _recorded_event():
    event = torch.cuda.Event()
    event.record()
    return event
