"""A user's PyTorch `nn.Module` as a `udfs.core.models.Model`: the flat vector fedspark trains,
averages, masks and checkpoints, mapped onto the module's tensors.

* **The vector.** Every trainable parameter (in `named_parameters` order), then every floating
  point buffer (in `named_buffers` order: BatchNorm's running mean and variance). A buffer has a
  zero gradient, so SGD, momentum and Adam leave it alone; the training forward pass writes its new
  value straight into the vector, so a client's update carries it and FedAvg averages it. Integer
  buffers (BatchNorm's `num_batches_tracked`) stay in each worker's module and are not trained.
* **No copies.** Each parameter and buffer is bound as a `torch.from_numpy` view of its slice of
  theta, and each parameter's `.grad` as a view of its slice of the gradient vector, which autograd
  accumulates into in place: a step moves no parameter data between numpy and torch.
* **One module per Python worker** for each (source, dtype), built on its first task, with one
  intra-op thread (the Spark task is the unit of parallelism, as for numpy's BLAS).
* **The source.** `module` is "package.module:factory", importable on the driver and executors, or
  a factory in the user's own file, whose text travels inside the model (a few kB in each task
  description) and is loaded on the executor under a name derived from its SHA-256: executors need
  no copy of the file, and the run's model/ keeps it beside the weights.

torch is an optional dependency (`pip install 'fedspark[torch]'`); only this module imports it.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from udfs.core.models import Outputs

# model.torch.loss: the built-in losses and the head each implies; any other value is
# "package.module:function", a function (output, target) -> mean loss
LOSS_HEADS = {"cross_entropy": "softmax", "mse": "identity"}
# the batch fedspark runs through a fresh module to check its output shape against the data
PROBE_ROWS = 2


class TorchModelError(ValueError):
    """The module, its factory, its loss or its output does not fit the configured data."""


@dataclass(frozen=True)
class TorchSource:
    """Where the module comes from. `module` is "package.module:factory"; with `file_text` (the
    user's file, named `file_name`) the module part is that file's stem."""

    module: str
    kwargs_json: str = "{}"          # the factory's keyword arguments as canonical JSON (hashable)
    file_name: str | None = None
    file_text: str | None = None

    @property
    def sha256(self) -> str | None:
        return hashlib.sha256(self.file_text.encode()).hexdigest() if self.file_text is not None else None

    @property
    def kwargs(self) -> dict[str, Any]:
        return json.loads(self.kwargs_json)

    def factory(self) -> Callable[..., Any]:
        module_name, sep, attr = self.module.partition(":")
        if not sep or not module_name or not attr:
            raise TorchModelError(f"model.torch.module={self.module!r}: expected 'package.module:factory'")
        module = self._user_module() if self.file_text is not None else importlib.import_module(module_name)
        try:
            return getattr(module, attr)
        except AttributeError:
            raise TorchModelError(f"model.torch.module={self.module!r}: {module_name} has no {attr!r}") from None

    def _user_module(self) -> types.ModuleType:
        """The user's file as a module, loaded once per process under a name its hash fixes."""
        name = f"fedspark_user_model_{self.sha256}"
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__file__ = self.file_name
            exec(compile(self.file_text or "", self.file_name or name, "exec"), module.__dict__)  # noqa: S102
            sys.modules[name] = module
        return sys.modules[name]


@dataclass(frozen=True)
class Entry:
    """One tensor's place in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    trainable: bool

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class _Bound:
    """A worker's module and its tensors in vector order."""

    module: Any
    tensors: list[Any]
    loss: Callable[..., Any]


_WORKER_MODULES: dict[tuple[TorchSource, str, str], _Bound] = {}


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise TorchModelError("model.kind=torch needs PyTorch: pip install 'fedspark[torch]' "
                              f"(on the driver and every executor): {exc}") from None
    return torch


def _float_buffers(module: Any) -> list[tuple[str, Any]]:
    return [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]


def layout_of(module: Any) -> tuple[Entry, ...]:
    """The vector's entries for `module`: trainable parameters, then floating point buffers."""
    params = [{"name": n, "shape": list(p.shape), "trainable": True} for n, p in module.named_parameters()]
    buffers = [{"name": n, "shape": list(b.shape), "trainable": False} for n, b in _float_buffers(module)]
    return layout_entries(params + buffers)


def layout_entries(tensors: list[dict[str, Any]]) -> tuple[Entry, ...]:
    """Entries laid end to end from (name, shape, trainable) records, as spec.json lists them."""
    entries, offset = [], 0
    for t in tensors:
        entry = Entry(str(t["name"]), tuple(int(w) for w in t["shape"]), offset, bool(t["trainable"]))
        entries.append(entry)
        offset += entry.size
    return tuple(entries)


def resolve_loss(name: str) -> Callable[..., Any]:
    torch = _torch()
    if name == "cross_entropy":
        return torch.nn.functional.cross_entropy
    if name == "mse":
        return lambda out, target: torch.nn.functional.mse_loss(out.reshape(target.shape), target)
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise TorchModelError(f"model.torch.loss={name!r}: expected one of {sorted(LOSS_HEADS)} "
                              "or 'package.module:function'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise TorchModelError(f"model.torch.loss={name!r}: {exc}") from None


@dataclass(frozen=True)
class TorchModel(Outputs):
    """A PyTorch module behind the `Model` interface. `layout` is measured once on the driver
    (`create`) and travels with the model, so an executor checks its own module against it."""

    source: TorchSource
    input_shape: tuple[int, ...]
    loss: str
    n_classes: int                      # 0: regression
    layout: tuple[Entry, ...] = field(default=())

    kind = "torch"

    @classmethod
    def create(cls, source: TorchSource, input_shape: tuple[int, ...], loss: str, n_classes: int) -> TorchModel:
        """The model for `source` on rows reshaped to `input_shape`, checked: the factory builds a
        module whose output on a probe batch has one column per class (one for regression)."""
        model = cls(source, input_shape, loss, n_classes)
        if model.head == "softmax" and not n_classes:
            raise TorchModelError(f"model.torch.loss={loss} needs integer class labels; use mse")
        if model.head == "identity" and n_classes:
            raise TorchModelError(f"model.torch.loss={loss} needs real-valued labels; use cross_entropy")
        module = model._build("float32")
        model = cls(source, input_shape, loss, n_classes, layout_of(module))
        torch = _torch()
        with torch.no_grad():
            out = module.eval()(torch.zeros((PROBE_ROWS, *input_shape)))
        want = n_classes if model.head == "softmax" else 1
        if tuple(out.shape) not in ((PROBE_ROWS, want),) + (((PROBE_ROWS,),) if want == 1 else ()):
            raise TorchModelError(f"model.torch.module={source.module!r} returns shape {tuple(out.shape)} for a "
                                  f"batch of {PROBE_ROWS}; the data needs ({PROBE_ROWS}, {want})")
        return model

    # --- Model -----------------------------------------------------------------------------------

    @property
    def head(self) -> str:
        return LOSS_HEADS.get(self.loss, "softmax" if self.n_classes else "identity")

    @property
    def n_features(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def n_params(self) -> int:
        return sum(e.size for e in self.layout)

    @property
    def is_classifier(self) -> bool:
        return self.n_classes > 0

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "module": self.source.module, "kwargs": self.source.kwargs,
                "input_shape": list(self.input_shape), "loss": self.loss, "n_classes": self.n_classes,
                "file": self.source.file_name, "file_sha256": self.source.sha256,
                "tensors": [{"name": e.name, "shape": list(e.shape), "trainable": e.trainable}
                            for e in self.layout]}

    def init(self, rng: np.random.Generator, init: str, dtype: npt.DTypeLike) -> np.ndarray:
        """A fresh module's tensors as a vector. A module with `reset_from(rng, init)` (ours in
        udfs/adapters/torch_zoo.py) draws from `rng` itself, as the numpy models do; any other
        is built by its factory with torch's generator seeded from `rng` (the module's own
        initialisation, reproducible from the run seed; `model.init` does not apply)."""
        torch = _torch()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = self._build(np.dtype(dtype).name)
            if hasattr(module, "reset_from"):
                module.reset_from(rng, init)
            else:
                torch.manual_seed(int(rng.integers(2**63 - 1)))
                module = self._build(np.dtype(dtype).name)
        return np.concatenate([t.detach().reshape(-1).numpy() for t in self._tensors(module)]).astype(dtype)

    def loss_and_grad(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        bound = self._bound(theta)
        grad = np.zeros_like(theta)
        for entry, tensor in zip(self.layout, bound.tensors, strict=True):
            if entry.trainable:
                tensor.grad = self._view(grad, entry)
        bound.module.train()
        out = bound.module(self._inputs(X, theta.dtype))
        loss = bound.loss(out, self._target(y, theta.dtype))
        loss.backward()   # accumulates in place into the bound views of `grad`
        return float(loss.detach()), grad

    def decision(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        torch = _torch()
        bound = self._bound(theta)
        bound.module.eval()
        with torch.no_grad():
            out = bound.module(self._inputs(X, theta.dtype)).numpy()
        return out.reshape(len(out), -1)

    def output_loss(self, out: np.ndarray, y: np.ndarray) -> float:
        if self.loss in LOSS_HEADS:
            return super().output_loss(out, y)
        torch = _torch()
        with torch.no_grad():
            fn = resolve_loss(self.loss)
            return float(fn(torch.from_numpy(out), self._target(y, out.dtype))) * len(y)

    def files(self, theta: np.ndarray) -> dict[str, bytes]:
        """model.safetensors: the module's state_dict with theta's values (load it with
        `load_module`), and the user's file when the module came from one."""
        from safetensors.torch import save

        state = {k: v.detach().contiguous() for k, v in self.module_with(theta).state_dict().items()}
        out = {"model.safetensors": save(state)}
        if self.source.file_text is not None and self.source.file_name is not None:
            out[self.source.file_name] = self.source.file_text.encode()
        return out

    # --- the module ------------------------------------------------------------------------------

    def module_with(self, theta: np.ndarray) -> Any:
        """A module of its own (not the worker's) holding a copy of theta's values."""
        torch = _torch()
        module = self._build(theta.dtype.name)
        values = np.array(theta, copy=True)
        with torch.no_grad():
            for entry, tensor in zip(self.layout, self._tensors(module), strict=True):
                tensor.copy_(self._view(values, entry))
        return module

    def _build(self, dtype: str) -> Any:
        torch = _torch()
        try:
            module = self.source.factory()(**self.source.kwargs)
        except TorchModelError:
            raise
        except Exception as exc:
            raise TorchModelError(f"model.torch.module={self.source.module!r} with kwargs "
                                  f"{self.source.kwargs}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(module, torch.nn.Module):
            raise TorchModelError(f"model.torch.module={self.source.module!r} returned a "
                                  f"{type(module).__name__}, not a torch.nn.Module")
        return module.to(getattr(torch, dtype))

    @staticmethod
    def _tensors(module: Any) -> list[Any]:
        return [p for _, p in module.named_parameters()] + [b for _, b in _float_buffers(module)]

    def _bound(self, theta: np.ndarray) -> _Bound:
        """This worker's module with its tensors bound to views of theta."""
        key = (self.source, theta.dtype.name, self.loss)
        bound = _WORKER_MODULES.get(key)
        if bound is None:
            torch = _torch()
            torch.set_num_threads(1)
            module = self._build(theta.dtype.name)
            if layout_of(module) != self.layout:
                raise TorchModelError(f"model.torch.module={self.source.module!r} builds a different "
                                      "module here than on the driver (another version of the code?)")
            bound = _WORKER_MODULES[key] = _Bound(module, self._tensors(module), resolve_loss(self.loss))
        if theta.size != self.n_params:
            raise TorchModelError(f"theta has {theta.size} values; the module has {self.n_params}")
        for entry, tensor in zip(self.layout, bound.tensors, strict=True):
            tensor.data = self._view(theta, entry)
        return bound

    @staticmethod
    def _view(vector: np.ndarray, entry: Entry) -> Any:
        import torch

        return torch.from_numpy(vector[entry.offset:entry.offset + entry.size]).view(entry.shape)

    def _inputs(self, X: Any, dtype: np.dtype) -> Any:
        torch = _torch()
        if not isinstance(X, np.ndarray):
            raise TorchModelError("a PyTorch model needs dense features (the table's are sparse)")
        rows = np.ascontiguousarray(X, dtype=dtype)
        return torch.from_numpy(rows).view(len(rows), *self.input_shape)

    def _target(self, y: np.ndarray, dtype: np.dtype) -> Any:
        torch = _torch()
        if self.is_classifier:
            return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
        return torch.from_numpy(np.ascontiguousarray(y, dtype=dtype))


def load_module(model: TorchModel, safetensors_bytes: bytes) -> Any:
    """A fresh module from the model's factory with a saved state_dict (model.safetensors) loaded."""
    from safetensors.torch import load

    module = model._build("float32")
    state = load(safetensors_bytes)
    first = next(iter(state.values()), None)
    if first is not None and first.is_floating_point():
        module = module.to(first.dtype)
    module.load_state_dict(state)
    return module
