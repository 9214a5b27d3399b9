"""Which parts of a model the instruments can see, found by what the modules are, and said in words.

Per-layer gradient norms need nothing from the model: every module that owns trainable
parameters is a layer. Dead-unit and zero-activation statistics need an activation *module* to
hook. Besides torch's own activation classes, a module is taken as an activation when it
behaves like one: no parameters, buffers or children, and on a probe tensor it acts elementwise
(the same values whatever the tensor's shape) and non-linearly (``f(2x) != 2 f(x)``). That is how
GPT-2's ``NewGELUActivation`` or a user's ``Swish`` are recognised without a list of names.

What cannot be hooked is an activation computed by a *function* inside some ``forward``
(``F.relu(x)``, ``x.sigmoid()``) or inside a fused kernel (``nn.LSTM``'s gates). The first kind
is counted once, on the first sampled step, by :class:`FunctionalActivations` (a
``TorchFunctionMode`` that sees every torch function call, outside activation modules); both are
named in the run's log by :func:`describe`, so a user knows what dead-unit checks do not cover.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Threshold, nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
)  # fmt: skip
#: Modules whose activations run inside one kernel or a functional call: never hookable.
FUSED: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
#: Function names that are activations when called directly (F.relu, torch.tanh, Tensor.sigmoid, ...).
ACTIVATION_FUNCTIONS = frozenset({
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "gelu", "silu",
    "mish", "sigmoid", "sigmoid_", "tanh", "tanh_", "softplus", "hardswish", "hardsigmoid", "hardtanh",
    "logsigmoid",
})  # fmt: skip
_PROBE = torch.linspace(-3.0, 3.0, 24).reshape(2, 12)


def _leaf_without_state(module: nn.Module) -> bool:
    return not any(True for _ in module.children()) and not any(True for _ in module.parameters(recurse=False)) \
        and not any(True for _ in module.buffers(recurse=False))


def behaves_like_activation(module: nn.Module) -> bool:
    """A parameter-free module of the user's own class that acts elementwise and non-linearly.

    torch's own classes are judged by :data:`ACTIVATIONS` alone (``nn.Softmax``, ``nn.Dropout``,
    ``nn.Identity`` are parameter-free too, and none is an activation to count units of). The probe
    runs the module on a small CPU tensor without gradients; any error means "not an activation".
    """
    if isinstance(module, ACTIVATIONS):
        return True
    if type(module).__module__.startswith("torch.") or not _leaf_without_state(module):
        return False
    try:
        with torch.no_grad():
            y = module(_PROBE)
            flat = module(_PROBE.reshape(-1, 1)).reshape(_PROBE.shape)
            doubled = module(2 * _PROBE)
    except Exception:  # a module that needs other inputs, devices or shapes is not an elementwise function
        return False
    if not all(isinstance(t, torch.Tensor) and t.shape == _PROBE.shape for t in (y, flat, doubled)):
        return False
    return torch.allclose(y, flat, atol=1e-6) and not torch.allclose(doubled, 2 * y, atol=1e-4)


def activation_layers(model: nn.Module, extra: Iterable[str] = (), root: str = "(root)") -> list[tuple[str, nn.Module]]:
    """(name, module) of every activation module in model order; ``extra`` adds module names or
    class names that the probe cannot judge (a fused block whose output is an activation)."""
    extra = set(extra)
    return [(name or root, m) for name, m in model.named_modules()
            if name in extra or type(m).__name__ in extra or behaves_like_activation(m)]


class FunctionalActivations(TorchFunctionMode):
    """Counts activation functions called outside any hooked activation module, by name.

    Entered for one sampled step only: every torch call then pays a Python round trip. The
    activation modules' pre/post hooks (:meth:`enter`/:meth:`leave`) mark where their own
    ``F.relu`` calls happen, which are instrumented and not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}
        self._depth = threading.local()

    def enter(self, *_: object) -> None:
        self._depth.n = getattr(self._depth, "n", 0) + 1

    def leave(self, *_: object) -> None:
        self._depth.n = getattr(self._depth, "n", 1) - 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ACTIVATION_FUNCTIONS and not getattr(self._depth, "n", 0):
            self.calls[name.rstrip("_")] = self.calls.get(name.rstrip("_"), 0) + 1
        return func(*args, **(kwargs or {}))


def _names(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def describe(model: nn.Module, layers: list[str], activations: list[str], functional: dict[str, int] | None) -> str:
    """One log line: what the health instruments measure on this model and what they cannot see."""
    seen = (f"activation statistics (dead units, zero fraction) of {len(activations)} activation modules "
            f"({_names(activations)})" if activations else "no activation module to hook: dead-unit checks are off")
    text = f"Health instruments: gradient norms of {len(layers)} layers ({_names(layers)}); {seen}."
    unseen = []
    if functional:
        calls = ", ".join(f"{n} ×{c}" for n, c in sorted(functional.items()))
        unseen.append(f"activation functions called inside forward ({calls} per step): use modules "
                      "(nn.ReLU, ...) to have them checked")
    fused = sorted({type(m).__name__ for m in model.modules() if isinstance(m, FUSED)})
    if fused:
        unseen.append(f"activations inside fused modules ({', '.join(fused)})")
    if unseen:
        text += " Not instrumented: " + "; ".join(unseen) + "."
    return text
