"""Time spent inside modules during a pipeline call, without synchronising inside it."""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch import nn


class ModuleClock:
    """The spans of every forward of ``modules`` (pre-hook to hook) since the last :meth:`reset`.

    On CUDA, a pair of events around each forward, read after the run: a synchronise per module
    would stall the host at every layer and make every step host-bound, distorting the end-to-end
    time measured beside it. On the CPU, ``time.perf_counter``."""

    def __init__(self, modules: Sequence[nn.Module], cuda: bool) -> None:
        self.cuda = cuda
        self.spans: list[tuple[Any, Any]] = []
        self._open: dict[int, Any] = {}  # by module: a span may nest in another module's
        self._handles = []
        for module in modules:
            self._handles += [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _start(self, module: nn.Module, *args: Any) -> None:
        self._open[id(module)] = self._mark()

    def _stop(self, module: nn.Module, *args: Any) -> None:
        self.spans.append((self._open.pop(id(module)), self._mark()))

    def _seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def _ready(self) -> None:
        if self.cuda and self.spans:
            torch.cuda.synchronize()

    def total_seconds(self) -> float:
        """Summed time of every span."""
        self._ready()
        return sum(self._seconds(a, b) for a, b in self.spans)

    def first_to_last_seconds(self) -> float:
        """From the first span's start to the last span's end (a denoising loop, timed by its forwards)."""
        self._ready()
        return self._seconds(self.spans[0][0], self.spans[-1][1])

    def reset(self) -> None:
        self.spans.clear()
        self._open.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
