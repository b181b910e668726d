"""Backbones and the multi-head classifier every method trains.

A model is a trunk (image -> feature vector) plus named linear heads on that feature. ERM
uses the `target` head only; ClusterFix adds one pseudo-label head per class; SLIM's
last-layer retraining swaps the target head. Keeping trunk and heads apart is what lets the
methods share one training loop and lets GradCAM find the same layer (`trunk.layer4`) on
every architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["ARCHS", "Classifier", "SmallCNN", "build_classifier", "build_trunk", "cam_layer"]

ARCHS = ("small_cnn", "small_cnn_w16", "resnet18", "resnet34", "resnet50")
#: SmallCNN's width per arch: ``small_cnn_w16`` has half the channels (16/32/64/64), a quarter
#: of the compute per image: on a CPU it trains an epoch 2.3x faster and, for the same time,
#: learns the embedded benchmark better (more epochs fit; BENCHMARKS.md, "Quickstart").
SMALL_CNN_WIDTH = {"small_cnn": 32, "small_cnn_w16": 16}


class SmallCNN(nn.Module):
    """A four-block CNN for 28-64 px images: fast on a CPU, and shaped like a ResNet trunk
    (`layer4` is its last convolutional block) so GradCAM and feature extraction treat it alike.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.layer1 = block(3, width, 1)
        self.layer2 = block(width, 2 * width, 2)
        self.layer3 = block(2 * width, 4 * width, 2)
        self.layer4 = block(4 * width, 4 * width, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.pool(x), 1)


def _torchvision_resnet(arch: str, weights: str) -> tuple[nn.Module, int]:
    import torchvision.models as tvm

    builder = getattr(tvm, arch)
    tv_weights = None
    if weights == "imagenet":
        # Downloads once into torch's hub cache on a user's machine; never used by the tests.
        tv_weights = tvm.get_model_weights(arch).IMAGENET1K_V1
    net = builder(weights=tv_weights)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def build_trunk(arch: str, weights: str = "none") -> tuple[nn.Module, int]:
    """Return (trunk, feature_dim). `weights` is 'imagenet', 'none' or a state_dict path."""
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone arch {arch!r}; expected one of {ARCHS}")
    if arch in SMALL_CNN_WIDTH:
        trunk: nn.Module = SmallCNN(SMALL_CNN_WIDTH[arch])
        dim = trunk.out_features
    else:
        trunk, dim = _torchvision_resnet(arch, weights)
    if weights not in ("none", "imagenet"):
        load_trunk_weights(trunk, Path(weights))
    return trunk, dim


def load_trunk_weights(trunk: nn.Module, path: Path) -> None:
    """Load a state_dict saved from a trunk or a whole classifier (heads are ignored)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state_dict (a mapping of tensors), "
                         f"got {type(state).__name__}")
    for prefix in ("trunk.", "module.", "backbone."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit this backbone; missing keys "
                         f"{missing[:5]}, unexpected keys {unexpected[:5]}")


class Classifier(nn.Module):
    """Trunk + named heads. `forward` returns the target logits so standard tools (GradCAM,
    evaluation) see an ordinary classifier; `features` and `heads` serve the methods."""

    def __init__(self, trunk: nn.Module, feature_dim: int, heads: Mapping[str, int]) -> None:
        super().__init__()
        if "target" not in heads:
            raise ValueError("a Classifier needs a 'target' head")
        self.trunk = trunk
        self.feature_dim = feature_dim
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, n) for name, n in heads.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads["target"](self.trunk(x))


def build_classifier(arch: str, weights: str, heads: Mapping[str, int]) -> Classifier:
    trunk, dim = build_trunk(arch, weights)
    return Classifier(trunk, dim, heads)


def cam_layer(model: Classifier) -> nn.Module:
    """The last convolutional block, where GradCAM looks (ResNet `layer4`, SmallCNN alike)."""
    return model.trunk.layer4
