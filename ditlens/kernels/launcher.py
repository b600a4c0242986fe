"""Launch a compiled Triton kernel again without Triton's per-launch dispatch.

``fn[grid](*args, **constexprs)`` binds every argument, works out its specialization (dtype and
16-byte alignment of each pointer, the divisibility of each int), reads the runtime knobs and looks
the compiled kernel up, at every call. A model makes the same few launches thousands of times, and
in a host-bound loop (DiT-XL 512² eager: 28 attention launches per forward) that host time is paid
in full. :class:`LaunchCache` remembers the kernel Triton compiled for each exact launch signature
and launches it again through the compiled kernel's own launcher (``CompiledKernel[grid](*args)``,
every argument in the kernel's signature order).

The signature is each pointer's dtype and 16-byte alignment, each int's value (a finer key than
Triton's specialization on divisibility, so a hit runs the kernel Triton's dispatch would pick),
each other scalar's type, the compile-time constants and the current device.

The compiled kernel's launcher is Triton's, not a public API: should a Triton release change it so
that a replay is refused, the cache warns once and leaves every later launch to Triton's dispatch.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

# A launch cache holds at most this many signatures; beyond it starts afresh (a long-running server
# that meets many shapes keeps a bounded table).
MAX_SIGNATURES = 1024


def launch_signature(args: tuple) -> tuple:
    """What decides the compiled kernel for these runtime arguments (see the module docstring)."""
    # A plain loop with the exact-int test first: this runs at every launch. On the H100's host the key
    # and lookup took 15 us of an 85 us call as a generator with two isinstance calls per argument,
    # 10 us as this loop (BENCHMARKS.md §4, session 31).
    key = []
    for a in args:
        kind = type(a)
        if kind is int:
            key.append(a)
        elif isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        else:
            key.append(a if isinstance(a, int) else kind)
    return tuple(key)


def launch_key(args: tuple, constants: dict) -> tuple:
    """A :class:`LaunchCache` entry's key: the current device, the constants object and the signature."""
    return torch.cuda.current_device(), id(constants), launch_signature(args)


@dataclass
class _Launch:
    kernel: Any  # triton CompiledKernel
    constants: dict  # held, so that the id in the key is not reused while the entry lives
    tail: tuple  # the arguments after the runtime ones, in signature order (constexprs, defaults)


@dataclass
class LaunchCache:
    """``fn[grid](*args, **constants)`` for one ``@triton.jit`` function ``fn``; the first launch of
    each signature goes through Triton, later ones straight to the compiled kernel. ``constants``
    must be the same dict object for the same constants (e.g. from an ``lru_cache``): its id is
    part of the key."""

    fn: Any
    launches: dict[tuple, _Launch] = field(default_factory=dict)
    hits: int = 0
    refused: str | None = None  # why replays stopped (this Triton's launcher refused one), if they did

    def __call__(self, grid: tuple[int, ...], args: tuple, constants: dict) -> None:
        if self.refused is not None:
            self.fn[grid](*args, **constants)
            return
        key = launch_key(args, constants)
        launch = self.launches.get(key)
        if launch is None:
            tail = self._tail(len(args), constants)
            kernel = self.fn[grid](*args, **constants)
            if len(self.launches) >= MAX_SIGNATURES:
                self.launches.clear()
            self.launches[key] = _Launch(kernel, constants, tail)
            return
        grid3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        try:
            launch.kernel[grid3](*args, *launch.tail)
        except (TypeError, ValueError, AttributeError) as exc:  # the launcher parses arguments before it launches
            self.refused = f"{type(exc).__name__}: {exc}"
            self.launches.clear()
            warnings.warn(f"ditlens: this Triton's compiled-kernel launcher refused a replayed launch ({self.refused}); "
                          "launching through Triton's dispatch from now on", RuntimeWarning, stacklevel=2)
            self.fn[grid](*args, **constants)
            return
        self.hits += 1

    def _tail(self, n_runtime: int, constants: dict) -> tuple:
        names = self.fn.arg_names[n_runtime:]
        params = self.fn.signature.parameters
        missing = [n for n in names if n not in constants and params[n].default is inspect.Parameter.empty]
        if missing:
            raise TypeError(f"{getattr(self.fn, '__name__', 'kernel')}: no value for {', '.join(missing)}")
        return tuple(constants[n] if n in constants else params[n].default for n in names)
