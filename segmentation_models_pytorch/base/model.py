"""``SegmentationModel``: the skeleton every architecture shares.

An architecture's ``__init__`` only builds its decoder; this class builds the encoder, attaches the
heads, initialises them, checks and pads inputs, and runs encoder -> decoder -> heads.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _compat
from . import allocator, recompute
from . import initialization as init
from .heads import ClassificationHead, SegmentationHead
from .hub_mixin import SMPHubMixin

_AUX_KEYS = ("classes", "pooling", "dropout", "activation")


@torch.jit.unused  # TorchScript cannot compile the try block; it never needs the answer anyway
def is_torch_compiling():  # no annotations: TorchScript cannot resolve them on unused functions
    """True while torch.compile / torch.export traces the model (checks are skipped then)."""
    try:
        return torch.compiler.is_compiling()
    except Exception:  # very old torch
        return False


def _record_config(init_fn: Callable) -> Callable:
    """Wrap an architecture ``__init__`` so the instance remembers its constructor arguments.

    The arguments (defaults filled in, ``**kwargs`` flattened) become ``model.config``; this is what
    ``save_pretrained`` writes. Keys starting with ``_`` (e.g. ``_model_class`` from a saved
    config.json) are dropped before the real ``__init__`` sees them.
    """
    signature = inspect.signature(init_fn)
    var_kw = next(
        (p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD),
        None,
    )

    @functools.wraps(init_fn)
    def wrapper(self, *args: Any, **kwargs: Any) -> None:
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        config = {k: v for k, v in bound.arguments.items() if k != "self"}
        if var_kw is not None:
            config.update(config.pop(var_kw, {}))
        init_fn(self, *args, **kwargs)
        # The outermost __init__ finishes last, so a user subclass's own arguments win.
        object.__setattr__(self, "_hub_mixin_config", config)
        if getattr(self, "channels_last", False):
            # Convolutions run markedly faster on NHWC data (oneDNN on CPU, tensor cores on GPU).
            # Only memory layout changes: values, state-dict keys and shapes stay as in SMP.
            to_channels_last(self)

    wrapper.__signature__ = signature  # type: ignore[attr-defined]
    return wrapper


def to_channels_last(module: nn.Module) -> nn.Module:
    """Store every 4-D parameter and buffer in channels_last, in place.

    Unlike ``module.to(memory_format=torch.channels_last)`` this leaves other ranks alone (some timm
    models have 5-D weights, which ``Module.to`` rejects).
    """
    with torch.no_grad():
        for tensor in init.tensors_of(module):
            if tensor.dim() == 4 and not tensor.is_contiguous(memory_format=torch.channels_last):
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return module


class SegmentationModel(nn.Module, SMPHubMixin):
    """Base class of all segmentation models.

    Class attributes:
        requires_divisible_input_shape: the architecture needs ``H`` and ``W`` divisible by
            :attr:`input_divisor`. Such models pad other inputs internally and crop the output back
            (set ``model.pad_input = False`` to get SMP's strict error instead). Architectures that
            handle any size natively (Unet) set it to ``False``.
    """

    _is_torch_scriptable = True
    _is_torch_exportable = True
    _is_torch_compilable = True
    requires_divisible_input_shape = True
    # Class attributes read in forward must be TorchScript constants to be visible to it.
    __constants__ = ["requires_divisible_input_shape"]

    if TYPE_CHECKING:  # hidden at runtime: TorchScript cannot resolve these string annotations
        encoder: nn.Module
        decoder: nn.Module
        segmentation_head: nn.Module
        classification_head: Optional[nn.Module]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _record_config(cls.__dict__["__init__"])  # type: ignore[method-assign]

    def __init__(self) -> None:
        super().__init__()
        self._is_encoder_frozen = False
        self.pad_input = True
        # Keep weights and activations in channels_last internally; outputs are handed back in the
        # ordinary contiguous layout. Set to False (and call .to(memory_format=torch.contiguous_format))
        # to opt out.
        self.channels_last = True
        # In a training forward, keep only convolution outputs for backward and recompute the cheap
        # norm/activation tensors between them (base/recompute.py): less memory, same gradients.
        self.recompute_activations = True
        # Keep glibc from handing freed activation memory back to the kernel every step (page
        # faults cost a DeepLabV3+-mobilenet_v2 training step on CPU a fifth of its time);
        # a process-wide setting, skipped where the user set their own (base/allocator.py).
        allocator.tune_cpu_allocator()

    # ------------------------------------------------------------------ building helpers
    def build_encoder(
        self,
        encoder_name: str,
        in_channels: int,
        encoder_depth: int,
        encoder_weights: Any,
        **kwargs: Any,
    ) -> nn.Module:
        """Create ``self.encoder`` through the registry and return it."""
        from ..encoders import _weights, get_encoder

        # Pretrained weights are copied straight into the layout the model converts to after the build.
        with _weights.loading_channels_last() if self.channels_last else contextlib.nullcontext():
            self.encoder = get_encoder(
                encoder_name, in_channels=in_channels, depth=encoder_depth, weights=encoder_weights, **kwargs
            )
        return self.encoder

    def build_decoder(self, decoder_cls: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
        """Create and initialise ``self.decoder = decoder_cls(*args, **kwargs)``; return it.

        The decoder's layers skip their default initialisation (it would be overwritten at once, see
        :func:`~segmentation_models_pytorch.base.initialization.deferred_init`).
        """
        with init.deferred_init(lambda: decoder_cls(*args, **kwargs), init.DECODER_INIT_TYPES) as decoder:
            init.initialize_decoder(decoder)
        self.decoder = decoder
        self._decoder_initialized = True  # read once by initialize(), which would redo the work
        return decoder

    def build_heads(
        self,
        decoder_channels: int,
        classes: int,
        activation: Any = None,
        aux_params: Optional[Mapping[str, Any]] = None,
        kernel_size: int = 3,
        upsampling: float = 1,
    ) -> None:
        """Attach the segmentation head (and the classification head) and initialise the model."""
        self.segmentation_head = SegmentationHead(
            decoder_channels, classes, kernel_size=kernel_size, activation=activation, upsampling=upsampling
        )
        self.classification_head = self._classification_head(aux_params)
        self.initialize()

    def _classification_head(self, aux_params: Optional[Mapping[str, Any]]) -> Optional[nn.Module]:
        if not aux_params:  # None or {} (SMP's PSPNet also treats an empty dict as "no head")
            return None
        if not isinstance(aux_params, Mapping):
            raise TypeError(f"aux_params must be a dict like {{'classes': 4}}, got {aux_params!r}.")
        unknown = set(aux_params) - set(_AUX_KEYS)
        if unknown or "classes" not in aux_params:
            raise ValueError(
                f"aux_params accepts the keys {_AUX_KEYS} and needs 'classes'; got {dict(aux_params)}."
            )
        return ClassificationHead(in_channels=self.encoder.out_channels[-1], **aux_params)

    def initialize(self) -> None:
        """Initialise decoder and heads (the encoder keeps its own or pretrained weights)."""
        plan = init.InitPlan()  # all random fills at once, spread over a few RNG streams
        if not self.__dict__.pop("_decoder_initialized", False):
            init.initialize_decoder(self.decoder, plan)
        init.initialize_head(self.segmentation_head, plan)
        if self.classification_head is not None:
            init.initialize_head(self.classification_head, plan)
        plan.run()

    # ------------------------------------------------------------------ input handling
    @property
    def input_divisor(self) -> int:
        """``H`` and ``W`` must be multiples of this for the decoder's feature maps to line up."""
        return int(self.encoder.output_stride)

    def check_input_shape(self, x: torch.Tensor) -> None:
        """Raise a clear error for inputs the model cannot take.

        Checks the number of dimensions and channels; with ``pad_input = False`` also that ``H``/``W``
        are divisible by :attr:`input_divisor`, naming the nearest valid sizes.
        """
        if x.dim() != 4:
            raise ValueError(
                f"Expected a 4D input (batch, channels, height, width), got shape {tuple(x.shape)}."
            )
        expected = getattr(self.encoder, "_in_channels", None)
        if expected is not None and x.shape[1] != expected:
            raise ValueError(
                f"Expected input with {expected} channels (the model was built with "
                f"in_channels={expected}), got {x.shape[1]} channels in shape {tuple(x.shape)}."
            )
        if self.requires_divisible_input_shape and not self.pad_input:
            h, w = int(x.shape[-2]), int(x.shape[-1])
            s = self.input_divisor
            if h % s or w % s:

                def near(v: int) -> str:
                    lo, hi = v // s * s, -(-v // s) * s
                    return str(v) if v % s == 0 else (f"{lo} or {hi}" if lo else str(hi))

                raise RuntimeError(
                    f"Wrong input shape height={h}, width={w}. Expected image height and width "
                    f"divisible by {s}: use height {near(h)} and width {near(w)}, or set "
                    "model.pad_input = True to pad internally."
                )

    def _padding(self, h: int, w: int) -> List[int]:
        s = self.input_divisor
        ph, pw = (s - h % s) % s, (s - w % s) % s
        return [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]  # F.pad order: left, right, top, bottom

    def forward(self, x: torch.Tensor):
        """Run encoder, decoder and heads; return the mask or ``(mask, label)`` with ``aux_params``."""
        return self._segmentation_forward(x)

    def _segmentation_forward(self, x: torch.Tensor):
        # The body of forward, callable from subclasses that override forward (TorchScript has no
        # super()).
        if not torch.jit.is_scripting():
            if self._wants_recompute():
                return self._recomputing_forward(x)
        return self._plain_forward(x)

    @torch.jit.unused
    def _wants_recompute(self):
        return (
            getattr(self, "recompute_activations", False)
            and torch.is_grad_enabled()
            and not recompute.scope_active()  # already inside a scope
            and not (torch.jit.is_tracing() or is_torch_compiling())
        )

    @torch.jit.unused
    def _recomputing_forward(self, x):
        with recompute.recompute_scope(True):
            return self._plain_forward(x)

    def _plain_forward(self, x: torch.Tensor):
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or is_torch_compiling()):
            self.check_input_shape(x)
        h, w = x.shape[-2], x.shape[-1]
        pad = [0, 0, 0, 0]
        padded = False
        if self.requires_divisible_input_shape and self.pad_input:
            pad = self._padding(h, w)
            # While a graph is captured (trace, export, compile) pad unconditionally, often by 0:
            # branching on the example's size would make the graph valid for that size only.
            capturing = not torch.jit.is_scripting() and (torch.jit.is_tracing() or is_torch_compiling())
            padded = capturing or pad[1] > 0 or pad[3] > 0
            if padded:
                x = F.pad(x, pad)

        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.encoder(x)
        decoder_output = self.decoder(features)
        masks = self.segmentation_head(decoder_output)
        if padded:
            masks = self._crop(masks, pad, x.shape[-2], x.shape[-1], h, w)
        if self.channels_last:
            masks = masks.contiguous()

        if self.classification_head is not None:
            labels = self.classification_head(features[-1])
            return masks, labels
        return masks

    @staticmethod
    def _crop(masks: torch.Tensor, pad: List[int], ph: int, pw: int, h: int, w: int) -> torch.Tensor:
        """Remove the padding from ``masks`` (which may be at a different scale than the input)."""
        mh, mw = masks.shape[-2], masks.shape[-1]
        top, left = pad[2] * mh // ph, pad[0] * mw // pw
        bottom, right = mh - top - h * mh // ph, mw - left - w * mw // pw
        # A negative pad crops; unlike slicing it adds no size guards to torch.export graphs.
        return F.pad(masks, [-left, -right, -top, -bottom])

    @torch.inference_mode()
    def predict(self, x: torch.Tensor):
        """Switch to eval mode and run ``forward`` under ``torch.inference_mode()``."""
        if self.training:
            self.eval()
        return self(x)

    # ------------------------------------------------------------------ weights
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load weights; the caller's mapping is never modified.

        Checkpoints of SMP's deprecated ``timm-*`` encoders are renamed to the ``tu-`` layout. With
        ``strict=False``, tensors whose shape differs from the model's (e.g. a head trained for another
        number of classes) are skipped with a warning that lists them.
        """
        timm_name = getattr(self.encoder, "name", None) if hasattr(self, "encoder") else None
        if not isinstance(timm_name, str):
            timm_name = None
        state_dict = _compat.remap_state_dict(dict(state_dict), timm_name)
        if not strict:
            own = self.state_dict()
            mismatched = [
                (k, tuple(v.shape), tuple(own[k].shape))
                for k, v in state_dict.items()
                if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
            ]
            for key, _, _ in mismatched:
                del state_dict[key]
            if mismatched:
                lines = "\n".join(f" - {k}: {s} (weights) -> {m} (model)" for k, s, m in mismatched)
                warnings.warn(
                    f"Skipped weights whose shape does not match the model (train these layers):\n{lines}",
                    stacklevel=2,
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ freezing
    def train(self, mode: bool = True) -> SegmentationModel:
        """Like ``nn.Module.train``, but a frozen encoder (see :meth:`freeze_encoder`) stays in eval."""
        if not isinstance(mode, bool):
            raise ValueError(f"training mode is expected to be a bool, got {mode!r}.")
        self.training = mode
        for name, module in self.named_children():
            if name == "encoder" and self._is_encoder_frozen:
                continue
            module.train(mode)
        return self

    def _set_encoder_trainable(self, mode: bool) -> None:
        for param in self.encoder.parameters():
            param.requires_grad = mode
        for module in self.encoder.modules():
            # Normalisation layers with running statistics stop updating them while frozen.
            if isinstance(module, nn.modules.batchnorm._NormBase):
                module.train(mode)
        self._is_encoder_frozen = not mode

    def freeze_encoder(self) -> None:
        """Stop training the encoder: no gradients, and its BatchNorm statistics stay fixed."""
        self._set_encoder_trainable(False)

    def unfreeze_encoder(self) -> None:
        """Undo :meth:`freeze_encoder`."""
        self._set_encoder_trainable(True)

    # ------------------------------------------------------------------ config
    @property
    @torch.jit.unused
    def config(self) -> Dict[str, Any]:
        """The constructor arguments this model was built with."""
        return self.__dict__.get("_hub_mixin_config", {})


def decoder_norm(kwargs: Dict[str, Any], value: Union[bool, str, Dict[str, Any]]) -> Any:
    """Apply SMP's deprecated ``*_use_batchnorm`` aliases of ``decoder_use_norm``."""
    for old, new in _compat.RENAMED_DECODER_KWARGS:
        value = _compat.pop_renamed_kwarg(kwargs, old, new, value)
    return value


def feature_strides(encoder: nn.Module) -> Tuple[int, ...]:
    """Stride of each encoder feature; custom encoders without ``reductions`` get ``2**i``."""
    reductions = getattr(encoder, "reductions", None)
    if reductions is not None:
        return tuple(reductions)
    stride = getattr(encoder, "output_stride", 32)
    return tuple(min(2**i, stride) for i in range(len(encoder.out_channels)))
