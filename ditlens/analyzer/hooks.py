"""Attach and detach diffusers ``ModelHook``s so that nothing of ditlens stays on a module.

diffusers' :class:`~diffusers.hooks.HookRegistry` leaves an instance-level ``forward`` on the
module after its last hook is removed, and a ``_diffusers_hook`` registry if it created one.
``detach`` puts back exactly what ``attach`` found: the registry only if it was there, the
instance ``forward`` only if it was there.
"""

from __future__ import annotations

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

_REGISTRY_ATTR = "_diffusers_hook"
_FOUND_ATTR = "_ditlens_found"  # on the hook: (registry existed, instance forward existed)


def attach(module: nn.Module, hook: ModelHook, name: str) -> None:
    """Register ``hook`` under ``name`` on ``module`` (composes with diffusers' own hooks)."""
    setattr(hook, _FOUND_ATTR, _found_before_ditlens(module, hook))
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def _found_before_ditlens(module: nn.Module, hook: ModelHook) -> tuple[bool, bool]:
    """(registry existed, instance forward existed) before the first ditlens hook went on: every
    ditlens hook of a module carries the same pair, so whichever comes off last restores it."""
    if hasattr(hook, _FOUND_ATTR):  # taken off and put back on (take_off)
        return getattr(hook, _FOUND_ATTR)
    registry = getattr(module, _REGISTRY_ATTR, None)
    for other in getattr(registry, "hooks", {}).values():
        if hasattr(other, _FOUND_ATTR):
            return getattr(other, _FOUND_ATTR)
    if hasattr(registry, _FOUND_ATTR):  # every ditlens hook was taken off for a moment
        return getattr(registry, _FOUND_ATTR)
    return registry is not None, "forward" in module.__dict__


def take_off(module: nn.Module, name: str) -> ModelHook | None:
    """Remove the hook ``name`` so that it can be attached again (to change the nesting order:
    the last attached hook is the outermost). Nothing else of the module is restored."""
    registry = getattr(module, _REGISTRY_ATTR, None)
    hook = registry.get_hook(name) if registry is not None else None
    if hook is not None:
        registry.remove_hook(name, recurse=False)
        setattr(registry, _FOUND_ATTR, getattr(hook, _FOUND_ATTR, (True, True)))
    return hook


def detach(module: nn.Module, name: str) -> None:
    """Remove the hook ``name`` and whatever its attaching added to the module."""
    registry = getattr(module, _REGISTRY_ATTR, None)
    hook = registry.get_hook(name) if registry is not None else None
    if hook is None:
        return
    had_registry, had_forward = getattr(hook, _FOUND_ATTR, (True, True))
    registry.remove_hook(name, recurse=False)
    if registry.hooks:
        return
    if not had_forward:
        module.__dict__.pop("forward", None)
    if not had_registry:
        delattr(module, _REGISTRY_ATTR)


def registered(module: nn.Module, name: str) -> ModelHook | None:
    """The hook ``name`` on ``module``, or None."""
    registry = getattr(module, _REGISTRY_ATTR, None)
    return registry.get_hook(name) if registry is not None else None


def has_hook(module: nn.Module, name: str) -> bool:
    return registered(module, name) is not None
