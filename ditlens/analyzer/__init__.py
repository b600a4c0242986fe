"""Model adapters, capture hooks, redundancy metrics and maps (DESIGN §2-4).

Python API mirroring the CLI verbs::

    from ditlens.analyzer import profile, ProfileConfig, analyze, compare
    profile(pipe, ["a cat", "a dog"], "run.h5", ProfileConfig(steps=20, guidance=4.5))
    report = analyze("run.h5")
"""

from ditlens.analyzer.adapters import (
    AdapterRegistry,
    AttentionLayer,
    ForwardInfo,
    GroupedTensors,
    ModelAdapter,
    SDPACall,
    default_registry,
    load_adapter,
)
from ditlens.analyzer.capture import AttentionInterceptor, CaptureHandle, apply_capture

__all__ = [
    "AdapterRegistry", "AttentionInterceptor", "AttentionLayer", "CaptureHandle", "ForwardInfo", "GroupedTensors",
    "ModelAdapter", "ProfileConfig", "ProfileResult", "RawRequest", "SDPACall", "analyze", "apply_capture", "compare",
    "default_registry", "load_adapter", "profile",
]


def __getattr__(name: str):
    # Profiling writes traces (h5py); load it on first use so that the deployment path
    # (ditlens.compress -> adapters, capture) never imports h5py.
    if name in ("ProfileConfig", "ProfileResult", "RawRequest", "profile"):
        import importlib

        profile_module = importlib.import_module("ditlens.analyzer.profiler")

        return getattr(profile_module, name)
    raise AttributeError(f"module 'ditlens.analyzer' has no attribute {name!r}")


def analyze(*args, **kwargs):
    """See :func:`ditlens.analyzer.maps.analyze` (imports h5py lazily)."""
    from ditlens.analyzer.maps import analyze as _analyze

    return _analyze(*args, **kwargs)


def compare(*args, **kwargs):
    """See :func:`ditlens.analyzer.maps.compare`."""
    from ditlens.analyzer.maps import compare as _compare

    return _compare(*args, **kwargs)
