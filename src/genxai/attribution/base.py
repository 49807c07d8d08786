"""What every attribution method shares: one call shape, input checks, target handling, output form.

    heat = GradCAM(model, layer="layer4")(x, target=3)

A method subclass implements :meth:`Attribution.attribute` only; checks, target normalisation,
eval mode (every module's own mode restored after the call), float32 output on the input's device
and optional per-image min-max scaling happen here. Layer methods (the CAM family, Relevance-CAM)
derive from :class:`LayerAttribution`, which resolves the layer once (an unknown name lists the
closest names) and upsamples maps to the input size.

:func:`build` constructs any registered method by name with checked options: the one way the jobs,
the CLI and the diffusion trainer make methods (``build("rise", model, masks=1000)``).
"""

from __future__ import annotations

import difflib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from genxai.core.checks import check_images, check_model_dtype
from genxai.core.hooks import default_layer, resolve_layer
from genxai.core.maps import minmax_normalize
from genxai.core.modes import evaluation_mode
from genxai.core.registry import Registry
from genxai.core.targets import Target, as_target

METHODS: Registry[type[Attribution]] = Registry("attribution method")
register = METHODS.register


def reduce_channels(maps: torch.Tensor, how: str = "max_abs") -> torch.Tensor:
    """(N, C, H, W) -> (N, 1, H, W): ``max_abs`` (Simonyan), ``sum``, ``abs_sum``, ``l2`` or ``mean``."""
    if how == "max_abs":
        return maps.abs().amax(dim=1, keepdim=True)
    if how == "sum":
        return maps.sum(dim=1, keepdim=True)
    if how == "abs_sum":
        return maps.abs().sum(dim=1, keepdim=True)
    if how == "l2":
        return maps.pow(2).sum(dim=1, keepdim=True).sqrt()
    if how == "mean":
        return maps.mean(dim=1, keepdim=True)
    raise ValueError(f"reduce: expected 'max_abs', 'sum', 'abs_sum', 'l2' or 'mean', got {how!r}")


def upsample_to(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, 1, h, w) maps to ``size`` (no-op when already there)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


class Attribution(ABC):
    """Base class: ``Method(model, **options)(x, target=None) -> maps``.

    Args:
        model: any ``nn.Module`` taking a (N, C, H, W) batch. A call runs it in eval mode (no
            BatchNorm statistics update, no dropout) and gives every module its own mode back
            afterwards, exceptions included; ``requires_grad`` flags are left as they are and
            nothing stays attached after a call. ``x`` must be in the model's precision
            (float64 only for a float64 model).
        normalize: min-max scale each returned map to [0, 1].
        autocast: run forwards under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``).

    ``target`` in ``__call__``: int class, (N,) tensor of classes, callable ``output -> (N,)`` or a
    :class:`genxai.targets.Target`; None explains the predicted class (or a single logit).
    """

    name: ClassVar[str] = ""
    #: "map": an explanation of the input (scored by the metrics); "image": a synthesised input.
    output: ClassVar[str] = "map"

    def __init__(self, model: nn.Module, *, normalize: bool = False, autocast: torch.dtype | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.normalize = normalize
        self.autocast = autocast

    def __call__(self, x: torch.Tensor, target: Any = None, **kwargs: Any) -> torch.Tensor:
        x = check_model_dtype(check_images(x, "x"), self.model, "x")
        target = as_target(target)
        with evaluation_mode(self.model):  # an explanation never changes the model
            maps = self.attribute(x, target, **kwargs).float()
        return minmax_normalize(maps) if self.normalize else maps

    @abstractmethod
    def attribute(self, x: torch.Tensor, target: Target, **kwargs: Any) -> torch.Tensor:
        """The method itself: checked input ``x`` and a normalised ``target`` -> raw maps."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__})"


class LayerAttribution(Attribution):
    """Base of methods that explain through one layer's activations: maps are (N, 1, H, W).

    Args:
        layer: dotted module name (e.g. ``"layer4"`` or ``"features.28"``) or the module itself.
        upsample: resize maps bilinearly to the input size (False keeps the layer's resolution).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module,
        *,
        upsample: bool = True,
        normalize: bool = False,
        autocast: torch.dtype | None = None,
    ):
        super().__init__(model, normalize=normalize, autocast=autocast)
        self.layer_name, self.layer = resolve_layer(model, layer)
        self.upsample = upsample

    def finish(self, maps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Bring layer-resolution maps (N, 1, h, w) to the output form."""
        if maps.ndim == 3:
            maps = maps.unsqueeze(1)
        return upsample_to(maps, tuple(x.shape[-2:])) if self.upsample else maps

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__}, layer={self.layer_name!r})"


# --- building methods by name ----------------------------------------------------------------------


def _method_class(method: str | type[Attribution]) -> type[Attribution]:
    if isinstance(method, str):
        return METHODS.get(method)
    if isinstance(method, type) and issubclass(method, Attribution):
        return method
    raise TypeError(f"method: expected a registered method name or an Attribution class, got {method!r}")


def _label(method: str | type[Attribution], cls: type[Attribution]) -> str:
    if isinstance(method, str):
        return f"{METHODS.canonical(method)!r} ({cls.__name__})"
    name = next((n for n in METHODS.names() if METHODS.get(n) is cls), None)
    return f"{name!r} ({cls.__name__})" if name else cls.__name__


def accepted_options(method: str | type[Attribution]) -> tuple[str, ...]:
    """The constructor options of a method, in signature order (``model`` left out; ``layer`` for
    layer methods). ``**kwargs`` are followed to the base class they are passed to, so the base
    options (``normalize``, ``autocast``, ``upsample``) are included."""
    cls = _method_class(method)
    names: list[str] = []
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        if klass is object:
            break
        forwards = False
        for i, param in enumerate(inspect.signature(init).parameters.values()):
            if i == 0 or param.kind is inspect.Parameter.VAR_POSITIONAL:
                continue  # self, *args
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif param.name not in names:
                names.append(param.name)
        if not forwards:  # **kwargs go on to the next __init__ in the MRO (super().__init__)
            break
    return tuple(n for n in names if n != "model")


def check_options(method: str | type[Attribution], options: Mapping[str, Any]) -> None:
    """Raise ValueError naming the method, the unknown option and the closest accepted ones when
    ``options`` holds a name the method's constructor does not take."""
    cls = _method_class(method)
    label = _label(method, cls)
    if not isinstance(options, Mapping):
        raise ValueError(
            f"options: expected a mapping of option names to values for method {label}, got {options!r}"
        )
    accepted = accepted_options(cls)
    for key in options:
        if key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"options: method {label} has no option {key!r}.{hint} Accepted: {', '.join(accepted)}"
            )


def build(
    method: str | type[Attribution],
    model: nn.Module,
    layer: str | nn.Module | None = None,
    *,
    require_map: bool = False,
    **options: Any,
) -> Attribution:
    """Construct a method by registry name or alias (or class) for ``model``, options checked.

    Args:
        method: ``"gradcam"``, ``"Grad-CAM++"``, ``"rise"``, ... (see ``names()``).
        layer: passed to layer methods only (the CAM family, Relevance-CAM); other methods ignore
            it, so one call shape serves every method. None gives a layer method the model's
            default layer (``model.default_layer``, else the top-level block holding the last
            Conv2d; see :func:`genxai.core.hooks.default_layer`).
        require_map: refuse methods that synthesise an image instead of explaining the input with
            a map (class model visualisation), where a saliency map is needed.
        options: constructor options of the method; a name it does not take is a ValueError
            naming the method, the option and the closest accepted ones.
    """
    cls = _method_class(method)
    label = _label(method, cls)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if require_map and cls.output != "map":
        maps = [n for n in METHODS.names() if METHODS.get(n).output == "map"]
        raise ValueError(
            f"method: {label} makes an image (output {cls.output!r}), not a saliency map of the input, "
            f"and a map is needed here. Map methods: {', '.join(maps)}"
        )
    check_options(cls, options)
    if not issubclass(cls, LayerAttribution):
        return cls(model, **options)
    if layer is None:
        try:
            layer = default_layer(model)
        except ValueError as err:
            raise ValueError(
                f"layer: method {label} explains a layer; {str(err).removeprefix('layer: ')}"
            ) from None
    return cls(model, layer=layer, **options)
