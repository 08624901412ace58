"""One registry and one factory per model family (the timm ``_registry.py`` / ``_factory.py`` idea).

A family is a kind of model that stage code asks for by name: ``"image_encoder"`` now,
``"segmenter"`` for stage 2. Builders are plain callables returning an ``nn.Module``; they are
registered with :func:`register_model` when the module defining them is imported. The factories
import the built-in modules of a family (``_BUILTIN_MODULES``) on first use, so ``import models``
stays light; a new family adds its modules there and a ``create_<family>`` wrapper here.

Example::

    @register_model("image_encoder", "rescnn3d")
    def rescnn3d(**kwargs) -> ResCNNEncoder:
        return ResCNNEncoder(spatial_dims=3, **kwargs)

    encoder = create_image_encoder("rescnn3d", channels=(8, 16, 32))
    segmenter = create_model("segmenter", "unet", encoder=encoder, num_classes=4)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from torch import nn

if TYPE_CHECKING:
    from mosmos.models.encoders.base import ImageEncoder

__all__ = ["create_image_encoder", "create_model", "list_families", "list_models", "register_model"]

_BuilderT = TypeVar("_BuilderT", bound=Callable[..., nn.Module])
_REGISTRY: dict[str, dict[str, Callable[..., nn.Module]]] = {}
_BUILTIN_MODULES: dict[str, tuple[str, ...]] = {
    "image_encoder": ("mosmos.models.encoders",),
    "segmenter": ("mosmos.models.segmentation",),
}


def _load_builtin(family: str | None = None) -> None:
    families = _BUILTIN_MODULES if family is None else {family: _BUILTIN_MODULES.get(family, ())}
    for modules in families.values():
        for module in modules:
            importlib.import_module(module)


def register_model(family: str, name: str) -> Callable[[_BuilderT], _BuilderT]:
    """Decorator registering ``builder(**kwargs) -> nn.Module`` as ``name`` in ``family``.

    Raises:
        ValueError: if ``name`` is already registered in ``family`` (two modules would otherwise
            silently shadow each other depending on import order).
    """
    if not family or not name:
        raise ValueError(f"register_model needs a non-empty family and name, got {family!r}, {name!r}")

    def decorator(builder: _BuilderT) -> _BuilderT:
        models = _REGISTRY.setdefault(family, {})
        if name in models:
            raise ValueError(f"model {name!r} is already registered in family {family!r}")
        models[name] = builder
        return builder

    return decorator


def list_families() -> list[str]:
    """Sorted names of the families that have at least one registered model."""
    _load_builtin()
    return sorted(_REGISTRY)


def list_models(family: str | None = None) -> list[str]:
    """Sorted registered names in ``family``, or in every family when ``family`` is None.

    Raises:
        ValueError: for an unknown family, listing the known ones.
    """
    _load_builtin(family)
    if family is None:
        return sorted({name for models in _REGISTRY.values() for name in models})
    if family not in _REGISTRY:
        raise ValueError(f"unknown model family {family!r}; valid families: {list_families()}")
    return sorted(_REGISTRY[family])


def create_model(family: str, name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` in ``family`` with constructor ``kwargs``.

    The returned module carries ``model_name = name`` so that exporters can write
    ``{"name": m.model_name, **m.encoder_config()}`` and rebuild it later.

    Raises:
        ValueError: for an unknown family or name, listing the valid ones.
    """
    valid = list_models(family)
    if name not in valid:
        raise ValueError(f"unknown {family} {name!r}; valid names: {valid}")
    model = _REGISTRY[family][name](**kwargs)
    model.model_name = name
    return model


def create_image_encoder(name: str, **kwargs: Any) -> ImageEncoder:
    """Build a registered image encoder (family ``"image_encoder"``) by name.

    Example::

        encoder = create_image_encoder("rescnn3d", channels=(16, 32, 64, 128))
        out = encoder(torch.randn(2, 1, 64, 64, 32))  # {"features": [...], "pooled": [2, 128]}
    """
    return create_model("image_encoder", name, **kwargs)
