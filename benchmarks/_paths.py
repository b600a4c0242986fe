"""Import-path order for the benchmark scripts.

Python puts a script's folder first on ``sys.path``, where ``benchmarks/kernels.py`` would shadow
the ``kernels`` package that transformers imports. Each script calls :func:`benchmarks_last` before
importing diffusers: the folder moves to the end, so siblings (``random_pipelines``,
``profile_host``) still import and installed packages win.
"""

from __future__ import annotations

import sys
from pathlib import Path


def benchmarks_last() -> None:
    """Move this folder to the end of ``sys.path`` (adding it if absent)."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here] + [str(here)]
