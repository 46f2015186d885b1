"""Name -> attention class registry.

Each method module decorates its class with ``@register``; every module in this package
is imported on first use (pkgutil discovery), so adding a method means adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from attention.base import Attention, AttentionOptions

_REGISTRY: dict[str, type[Attention]] = {}
_NOT_METHODS = {"base", "registry"}
_discovered = False


def register(cls: type[Attention]) -> type[Attention]:
    """Class decorator: register an Attention subclass under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} must set a non-empty class attribute 'name'")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"attention name '{cls.name}' is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    import attention as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_METHODS and not info.name.startswith("_"):
            importlib.import_module(f"attention.{info.name}")
    _discovered = True


def available() -> list[str]:
    """Sorted names of every registered attention method."""
    _discover()
    return sorted(_REGISTRY)


def get(name: str) -> type[Attention]:
    """The class registered as ``name``; unknown names list the valid ones."""
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention '{name}'; available: {', '.join(available())}")
    return _REGISTRY[name]


def check_tensor_parallel(name: str, num_heads: int, tp: int) -> None:
    """Raise a one-line ValueError when method ``name`` cannot split num_heads heads over tp.

    Config validation calls this before any process group exists; ``Attention.parallelize``
    raises the same messages.
    """
    get(name).check_tensor_parallel(num_heads, tp)


def tensor_parallel_methods() -> list[str]:
    """Sorted names of the methods whose heads can be split over tensor-parallel ranks."""
    return [name for name in available() if _REGISTRY[name].supports_tensor_parallel]


def parse_options(name: str, options: dict[str, Any] | AttentionOptions | None) -> AttentionOptions:
    """Validate a method's options dict into its typed Options model."""
    cls = get(name)
    if isinstance(options, cls.Options):
        return options
    try:
        return cls.Options(**(dict(options or {})))
    except Exception as err:  # pydantic.ValidationError: re-raise as one readable line
        valid = ", ".join(sorted(cls.Options.model_fields))
        raise ValueError(
            f"attention '{name}' options: {_first_line(err)}; valid options: {valid}"
        ) from err


def _first_line(err: Exception) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        parts = []
        for e in errors():
            loc = ".".join(str(p) for p in e.get("loc", ()))
            parts.append(f"{loc}: {e.get('msg')} (got {e.get('input')!r})")
        return "; ".join(parts)
    return str(err).splitlines()[0]


def build(
    name: str,
    *,
    d_model: int,
    num_heads: int,
    causal: bool = False,
    layer_idx: int = 0,
    shared: nn.Module | None = None,
    **options: Any,
) -> Attention:
    """Build attention method ``name``: a module [B, n, d_model] -> [B, n, d_model].

    Raises ValueError for an unknown name, bad options, or a mode the method does not
    support (for example ``causal=True`` for an encoder-only method).
    """
    cls = get(name)
    opts = parse_options(name, options)
    if shared is None:
        shared = cls.build_shared(d_model, num_heads, opts)
    return cls(d_model, num_heads, causal=causal, options=opts, layer_idx=layer_idx, shared=shared)
