"""The HDF5 trace store (DESIGN.md §3): format, crash-safe streaming writer, lazy reader, merge.

>>> from ditlens.traces import Trace
>>> with Trace.open("trace.h5") as trace:                      # doctest: +SKIP
...     l1 = trace.stat("image", "o", "step", "l1")            # prompt, branch, step, layer, head
...     per_layer = l1.sel(branch="cond").mean("prompt").mean("head")
"""

from ditlens.traces.format import (
    COMPARISONS,
    FORMAT,
    FORMAT_VERSION,
    GROUPS,
    METRICS,
    TENSORS,
    PromptArray,
    RawSelection,
    StatKey,
    TokenInfo,
    TraceHeader,
    all_stat_keys,
    parse_stat_path,
    stat_axes,
    stat_path,
)
from ditlens.traces.merge import merge_traces
from ditlens.traces.reader import LabelledArray, Trace
from ditlens.traces.writer import TraceWriter, open_for_append

__all__ = [
    "COMPARISONS",
    "FORMAT",
    "FORMAT_VERSION",
    "GROUPS",
    "METRICS",
    "TENSORS",
    "LabelledArray",
    "PromptArray",
    "RawSelection",
    "StatKey",
    "TokenInfo",
    "Trace",
    "TraceHeader",
    "TraceWriter",
    "all_stat_keys",
    "merge_traces",
    "open_for_append",
    "parse_stat_path",
    "stat_axes",
    "stat_path",
]
