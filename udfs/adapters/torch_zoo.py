"""PyTorch modules fedspark ships, for `model.torch.module`:

* `udfs.adapters.torch_zoo:mlp` — the numpy MLP's twin: dense layers with ReLU between them,
  initialised from the run's generator exactly as `udfs.core.models.init_params` draws the numpy
  MLP (Glorot-uniform weights drawn in x out, row-major, layer by layer; zero biases), so the two
  start as the same function.
* `udfs.adapters.torch_zoo:cnn` — the CNN of McMahan et al. 2017 ("Communication-Efficient Learning
  of Deep Networks from Decentralized Data"): two 5x5 convolutions of 32 and 64 channels (same
  padding), each followed by ReLU and 2x2 max pooling, a 512-unit ReLU dense layer and a softmax
  output (the logits; the loss applies the softmax). On 28x28 inputs: 1,663,370 parameters, as in
  the paper.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from udfs.core.models import initialiser


class MLP(nn.Module):
    """in_features -> hidden... -> classes, ReLU between the layers."""

    def __init__(self, in_features: int, hidden: list[int], classes: int) -> None:
        super().__init__()
        widths = [in_features, *hidden, classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), -1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    def reset_from(self, rng: np.random.Generator, init: str) -> None:
        """The numpy MLP's initialisation (`model.init`), drawn from `rng` in its order."""
        draw = initialiser(init)
        with torch.no_grad():
            for layer in self.layers:
                assert isinstance(layer, nn.Linear)
                w = draw(rng, layer.in_features, layer.out_features)   # in x out, as numpy's
                layer.weight.copy_(torch.from_numpy(w.T))
                layer.bias.zero_()


def mlp(in_features: int, hidden: list[int], classes: int) -> MLP:
    return MLP(in_features, hidden, classes)


class CNN(nn.Module):
    """McMahan et al.'s CNN for channels x size x size images."""

    def __init__(self, channels: int, size: int, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        side = size // 4
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 512), nn.ReLU(),
                                        nn.Linear(512, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def cnn(channels: int = 1, size: int = 28, classes: int = 10) -> CNN:
    return CNN(channels, size, classes)
