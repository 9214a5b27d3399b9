"""Torch instruments: dead units, zero activations, per-layer gradient norms, non-finite flags.

Everything is computed on the model's device as small reductions and stays there; :meth:`read`
is the one host–device synchronisation (one copy of one small tensor), so callers do it on
logging steps only. Sampling is explicit and costs nothing when off: hooks exist only between
:meth:`Instruments.arm` and :meth:`Instruments.disarm`.

Order on a sampled step (the Monitor's contract)::

    inst.arm()                      # before the forward of a sampled step
    loss = loss_fn(model(x), y)
    inst.disarm()                   # right after that forward (validation must not be observed)
    loss.backward()                 # AMP: scaler.scale(loss).backward(); scaler.unscale_(opt)
    inst.capture_gradients()        # after backward/unscale_, before clipping and zero_grad
    ...
    sample = inst.read()            # on a logging step: the only sync

What is covered: outputs of activation *modules*: torch's activation classes, modules that
behave like one (parameter-free, elementwise, non-linear: GPT-2's ``NewGELUActivation``), and
modules named in ``health.activation_modules`` (see :mod:`tbhealth.instruments.coverage`).
Functional activations called inside ``forward`` (``F.relu(x)``, ``x.relu()``) have no module and
are not seen; the first sampled step counts them (``arm(probe=True)``) so :meth:`coverage` can
say so. Per-layer gradient norms need no hooks and cover every module owning parameters. A unit is
feature dimension 1: an ``(N, C, ...)`` output is reduced over N and all spatial dims, so for
``(N, T, C)`` sequence outputs the "units" are positions, which under-reports dead features.

AMP: capture gradients after ``scaler.unscale_`` or norms are multiplied by the loss scale; fp16
steps the GradScaler skips have Inf gradients by design (see ``divergence.nonfinite_gradients``).
``torch.compile``: gradient norms always work. Activation hooks reach a compiled graph only if
Dynamo (re)traces while they are registered (it does not guard on module hooks), so on an
already-compiled model ``dead_fraction`` reads ``None`` - "not measured", never a false "healthy".
DDP and compile wrappers are unwrapped
so layer names are the user's own ``named_modules()`` names (no ``module.``/``_orig_mod.``).
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial

import torch
from torch import Tensor, nn

from tbhealth.health.settings import HealthConfig
from tbhealth.instruments.coverage import ACTIVATIONS, FunctionalActivations, activation_layers, describe

ROOT = "(root)"
__all__ = ["ACTIVATIONS", "Instruments", "ROOT", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _reduce_dtype(device: torch.device) -> torch.dtype:
    # Squared norms overflow float32 above ~1.8e19; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


class Instruments:
    """Per-layer health measurements of one model; see the module docstring for the call order."""

    def __init__(self, model: nn.Module, settings: HealthConfig | None = None) -> None:
        self.model = unwrap(model)
        extra = settings.activation_modules if settings is not None else ()
        self.activation_layers: list[tuple[str, nn.Module]] = activation_layers(self.model, extra, ROOT)
        self.param_layers: list[tuple[str, list[nn.Parameter]]] = []
        for name, m in self.model.named_modules():
            params = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if params:
                self.param_layers.append((name or ROOT, params))
        self._handles: list = []
        self._functional: FunctionalActivations | None = None
        #: Activation functions called outside activation modules on the probed step (None: not probed yet).
        self.functional_calls: dict[str, int] | None = None
        self._index_cache: dict[tuple, Tensor] = {}
        self._reset()

    # ---------------------------------------------------------------------------- activations

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self, probe: bool = False) -> None:
        """Hook activation outputs for the next forward(s); call before a sampled step's forward.

        ``probe``: also count activation functions called outside activation modules until
        :meth:`disarm` (once per run: every torch call pays a Python round trip meanwhile).
        """
        if self._handles:
            return
        for name, module in self.activation_layers:
            self._handles.append(module.register_forward_hook(partial(self._observe, name)))
        if probe and self._functional is None and self.functional_calls is None:
            mode = self._functional = FunctionalActivations()
            for _, module in self.activation_layers:
                self._handles.append(module.register_forward_pre_hook(mode.enter))
                self._handles.append(module.register_forward_hook(mode.leave))
            mode.__enter__()

    def disarm(self) -> None:
        """Remove every hook: steps that are not sampled pay nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        mode, self._functional = self._functional, None
        if mode is not None:
            self.functional_calls = dict(mode.calls)
            try:
                mode.__exit__(None, None, None)
            except Exception:  # another mode entered meanwhile and not left: the count stands, nothing to undo
                pass

    def layer_names(self) -> list[str]:
        """Every layer measured (parameters or activations), in ``named_modules()`` order: the rows
        of the Health tab's per-layer view, in the order a reader knows from the model."""
        measured = {name for name, _ in self.param_layers} | {name for name, _ in self.activation_layers}
        return [n or ROOT for n, _ in self.model.named_modules() if (n or ROOT) in measured]

    def coverage(self) -> str:
        """What these instruments measure on this model and what they cannot see (for the run's log)."""
        return describe(self.model, [name for name, _ in self.param_layers],
                        [name for name, _ in self.activation_layers], self.functional_calls)

    def _observe(self, name: str, module: nn.Module, inputs, output) -> None:
        """Reduce one activation output to two small tensors at once; the output is not kept."""
        if not module.training:  # validation between two training steps is not what we sample
            return
        y = output[0] if isinstance(output, (tuple, list)) and output else output
        if not isinstance(y, Tensor) or y.dim() < 2 or y.numel() == 0:
            return
        # Nonzero outputs per unit, as 1.0s summed in float32: one vectorised reduction, 3-5x
        # cheaper on CPU than reducing a bool tensor twice (amax + sum; measured in
        # benchmarks/README.md). A NaN output sums to NaN, which is not 0: alive, never "dead".
        alive = y.detach().abs().sign_().sum(dim=(0, *range(2, y.dim())), dtype=torch.float32)
        count = alive.sum()
        previous = self._alive.get(name)
        if previous is not None and previous.shape == alive.shape:
            previous.add_(alive)
            self._nonzero[name].add_(count)
            self._numel[name] += y.numel()
        else:
            self._alive[name], self._nonzero[name], self._numel[name] = alive, count, y.numel()

    # ------------------------------------------------------------------------------ gradients

    def capture_gradients(self) -> None:
        """Per-layer and global gradient L2 norms of the current ``.grad`` s, on device.

        A layer is a module owning parameters directly; its norm covers those parameters only.
        Layers without gradients this step (unused, frozen) are left out.
        """
        grads: list[Tensor] = []
        owner: list[int] = []
        for i, (_, params) in enumerate(self.param_layers):
            for p in params:
                if p.grad is not None:
                    grads.append(p.grad.coalesce().values() if p.grad.is_sparse else p.grad)
                    owner.append(i)
        if not grads:
            return
        home = grads[0].device
        by_device: dict[torch.device, list[int]] = defaultdict(list)
        for j, g in enumerate(grads):
            by_device[g.device].append(j)
        order = [j for js in by_device.values() for j in js]
        norms = torch.cat([
            torch.stack(torch._foreach_norm([grads[j] for j in js], 2, dtype=torch.float32)).to(home, non_blocking=True)
            for js in by_device.values()
        ])  # fmt: skip
        squares = norms.to(_reduce_dtype(home)).square()
        present = tuple(sorted(set(owner)))
        index = self._index(tuple(owner[j] for j in order), present, home)
        per_layer = torch.zeros(len(present), dtype=squares.dtype, device=home).index_add_(0, index, squares).sqrt()
        bad = ~torch.isfinite(norms).all()
        self._grads = (present, per_layer, squares.sum().sqrt())
        self._grad_bad = bad if self._grad_bad is None else self._grad_bad | bad

    def _index(self, owners: tuple[int, ...], present: tuple[int, ...], device: torch.device) -> Tensor:
        # Built once per set of layers with gradients (normally once per run): no per-step upload.
        key = (owners, device)
        if key not in self._index_cache:
            slot = {layer: k for k, layer in enumerate(present)}
            self._index_cache[key] = torch.tensor([slot[o] for o in owners], device=device)
        return self._index_cache[key]

    # ------------------------------------------------------------------------------- reading

    def read(self, reported: Tensor | None = None) -> dict:
        """The one sync point: what was measured since the last read, as Python values.

        Keys: ``layer_grad_norms`` {layer: norm} and ``global_grad_norm`` (latest capture),
        ``dead_fraction`` / ``zero_fraction`` {activation layer: fraction 0–1} (over all sampled
        forwards), ``nonfinite`` ("gradients" when a captured gradient held NaN/Inf, else None;
        a non-finite loss shows in the Monitor's device-side epoch loss sum instead).
        A measurement not taken since the last read is ``None``. ``reported`` (a scalar tensor,
        the gradient norm the loop reported) is read in the same transfer: ``reported_grad_norm``.
        """
        parts: list[Tensor] = []
        acts = list(self._alive)
        if self._grad_bad is not None:
            parts.append(self._grad_bad.reshape(1))
        if self._grads is not None:
            parts += [self._grads[2].reshape(1), self._grads[1]]
        for name in acts:
            parts += [self._nonzero[name].reshape(1), self._alive[name].eq(0).sum().reshape(1)]
        if reported is not None:
            parts.append(reported.detach().reshape(1))
        values = self._fetch(parts)
        out: dict = {"nonfinite": None}
        if self._grad_bad is not None and values.pop(0):
            out["nonfinite"] = "gradients"
        out["layer_grad_norms"] = out["global_grad_norm"] = None
        if self._grads is not None:
            present = self._grads[0]
            out["global_grad_norm"] = values.pop(0)
            out["layer_grad_norms"] = {self.param_layers[i][0]: values.pop(0) for i in present}
        zero, dead = {}, {}
        for name in acts:
            nonzero, dead_units = values.pop(0), values.pop(0)
            zero[name] = 1.0 - nonzero / self._numel[name]
            dead[name] = dead_units / self._alive[name].numel() if self._alive[name].numel() else 0.0
        out["zero_fraction"], out["dead_fraction"] = (zero, dead) if acts else (None, None)
        out["reported_grad_norm"] = values.pop(0) if reported is not None else None
        self._reset()
        return out

    def _fetch(self, parts: list[Tensor]) -> list[float]:
        if not parts:
            return []
        home = parts[0].device
        dtype = _reduce_dtype(home)
        flat = torch.cat([p.to(home, dtype=dtype, non_blocking=True) for p in parts])
        return flat.cpu().tolist()  # the sync

    def _reset(self) -> None:
        self._alive: dict[str, Tensor] = {}
        self._nonzero: dict[str, Tensor] = {}
        self._numel: dict[str, int] = {}
        self._grads: tuple[tuple[int, ...], Tensor, Tensor] | None = None
        self._grad_bad: Tensor | None = None
