"""Device constants that must outlive the CUDA graphs that read them.

A CUDA graph stores raw device pointers. The kernels read small constant tensors that live
outside the graph: per-plan mode/window/order tensors, masks, block masks, head-index tensors.
They come from caches that evict (``functools.lru_cache``) or belong to a plan runtime that is
garbage-collected once the plan is removed, and the graph of that plan can still be replayed
later. Freed memory goes back to the caching allocator, something else is written there, and a
replay reads it: out-of-range head indices, wrong masks.

So every such constant passes through :func:`graph_constant` when it is used. While a capture is
recording (:func:`record_graph_constants`), the constant is added to the capture's list, which the
graph runner keeps next to the graph: the memory stays allocated as long as the graph exists.
Outside a capture the call costs one context-variable read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")

# The list of the capture that is recording, if any (a context variable: one per thread/task).
_RECORDING: ContextVar[list[Any] | None] = ContextVar("ditlens_graph_constants", default=None)


def graph_constant(value: T) -> T:
    """Hand ``value`` back; during a capture, also keep it alive with the graph."""
    recording = _RECORDING.get()
    if recording is not None:
        recording.append(value)
    return value


@contextmanager
def record_graph_constants() -> Iterator[list[Any]]:
    """Collect the constants the code inside uses; the caller keeps the list with its graph."""
    kept: list[Any] = []
    token = _RECORDING.set(kept)
    try:
        yield kept
    finally:
        _RECORDING.reset(token)
