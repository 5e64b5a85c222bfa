"""The models behind `udfs.core.models.Model`, and the one place that maps a model's kind to its
implementation: `build` for a new model (from `ModelRequest`, what the config and the data say),
`from_description` for a saved one (spec.json and the files beside it). Trainers, evaluation,
scoring and storage only ever call the interface.

torch is imported only when a torch model is asked for: the built-ins need no PyTorch.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from udfs.core.models import HEADS, Model, ModelSpec

# model.kind: the built-in numpy models, then the adapters for models users bring
USER_KINDS = ("torch", "sklearn")
# user kinds that train without a gradient, by their own partial_fit (no sync, no FedProx)
GRADIENT_FREE_KINDS = ("sklearn",)
KINDS = (*HEADS, *USER_KINDS)


@dataclass(frozen=True)
class TorchRequest:
    """model.torch: the module's factory ("package.module:factory"), its kwargs, the user's file
    (name and text) when the factory lives in one, and the loss."""

    module: str
    kwargs: dict[str, Any]
    loss: str
    file_name: str | None = None
    file_text: str | None = None


@dataclass(frozen=True)
class SklearnRequest:
    """model.sklearn: the estimator's class name and its parameters."""

    estimator: str
    params: dict[str, Any]


@dataclass(frozen=True)
class ModelRequest:
    """What a new model is built from: the config's model section and the data's shape."""

    kind: str
    n_features: int
    n_classes: int                    # 0: real-valued labels
    hidden: tuple[int, ...] = ()
    input_shape: tuple[int, ...] | None = None
    torch: TorchRequest | None = None
    sklearn: SklearnRequest | None = None


def _builtin(request: ModelRequest) -> Model:
    if request.kind != "linear" and request.n_classes == 0:
        raise ValueError(f"model.kind={request.kind} needs integer class labels; use model.kind=linear")
    if request.kind == "logistic" and request.n_classes > 2:
        raise ValueError("model.kind=logistic is binary; use softmax or mlp")
    return ModelSpec.build(request.kind, request.n_features, max(request.n_classes, 1), list(request.hidden))


def _torch(request: ModelRequest) -> Model:
    from udfs.adapters.torch_module import TorchModel, TorchSource

    t = request.torch
    if t is None:
        raise ValueError("model.kind=torch needs model.torch.module")
    source = TorchSource(t.module, json.dumps(t.kwargs, sort_keys=True), t.file_name, t.file_text)
    return TorchModel.create(source, request.input_shape or (request.n_features,), t.loss, request.n_classes)


def _sklearn(request: ModelRequest) -> Model:
    from udfs.adapters.sklearn_estimator import SklearnModel

    s = request.sklearn
    if s is None:
        raise ValueError("model.kind=sklearn needs model.sklearn.estimator")
    return SklearnModel(s.estimator, json.dumps(s.params, sort_keys=True), request.n_features, request.n_classes)


BUILDERS: dict[str, Callable[[ModelRequest], Model]] = {**{k: _builtin for k in HEADS}, "torch": _torch,
                                                        "sklearn": _sklearn}


def build(request: ModelRequest) -> Model:
    return BUILDERS[request.kind](request)


def from_description(meta: dict[str, Any], read: Callable[[str], bytes | None]) -> Model:
    """The model a spec.json describes; `read(name)` returns a file of the model directory (the
    user's module source) or None."""
    if meta["kind"] not in USER_KINDS:
        return ModelSpec.from_dict(meta)
    if meta["kind"] == "sklearn":
        from udfs.adapters.sklearn_estimator import SklearnModel

        return SklearnModel(meta["estimator"], json.dumps(meta["params"], sort_keys=True),
                            int(meta["n_features"]), int(meta["n_classes"]))
    from udfs.adapters.torch_module import TorchModel, TorchSource, layout_entries

    text = None
    if meta.get("file"):
        data = read(meta["file"])
        if data is None:
            raise FileNotFoundError(f"the model's module file {meta['file']} is missing beside spec.json")
        text = data.decode()
    source = TorchSource(meta["module"], json.dumps(meta["kwargs"], sort_keys=True), meta.get("file"), text)
    if text is not None and source.sha256 != meta.get("file_sha256"):
        raise ValueError(f"{meta['file']}: its SHA-256 is not the one spec.json recorded")
    return TorchModel(source, tuple(meta["input_shape"]), meta["loss"], int(meta["n_classes"]),
                      layout_entries(meta["tensors"]))
