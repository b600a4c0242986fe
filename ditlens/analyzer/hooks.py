"""Attach and detach diffusers ``ModelHook``s so that nothing of ditlens stays on a module.

diffusers' :class:`~diffusers.hooks.HookRegistry` leaves a ``_diffusers_hook`` registry and an
instance-level ``forward`` on the module after its last hook is removed. When ditlens created
those, it removes them again, so a module is exactly as it was before ``attach``.
"""

from __future__ import annotations

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

_REGISTRY_ATTR = "_diffusers_hook"
# Marks registries ditlens created, so detach can drop them once empty.
_OWNED_FLAG = "_ditlens_owns_registry"


def attach(module: nn.Module, hook: ModelHook, name: str) -> None:
    """Register ``hook`` under ``name`` on ``module`` (composes with diffusers' own hooks)."""
    owned = not hasattr(module, _REGISTRY_ATTR)
    had_forward = "forward" in module.__dict__
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if owned:
        setattr(registry, _OWNED_FLAG, not had_forward)
    registry.register_hook(hook, name)


def detach(module: nn.Module, name: str) -> None:
    """Remove the hook ``name``; drop the registry and instance ``forward`` if ditlens made them."""
    registry = getattr(module, _REGISTRY_ATTR, None)
    if registry is None or registry.get_hook(name) is None:
        return
    registry.remove_hook(name, recurse=False)
    owned = getattr(registry, _OWNED_FLAG, None)
    if not registry.hooks and owned is not None:
        delattr(module, _REGISTRY_ATTR)
        if owned:
            module.__dict__.pop("forward", None)


def has_hook(module: nn.Module, name: str) -> bool:
    registry = getattr(module, _REGISTRY_ATTR, None)
    return registry is not None and registry.get_hook(name) is not None
