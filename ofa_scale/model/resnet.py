"""OFA's image stem (spec §4.2): a torchvision-style Bottleneck ResNet v1.5 truncated after layer3.

Output: 1024 channels at stride 16 (256 px -> 16×16 grid). Plain torch (BatchNorm, no layer factory): the stem is
replicated under tensor parallelism. Drop-path: block 0 of a stage has none, block i uses
linspace(0, rate, n_blocks)[i]. Module names match OFA's state dict (`conv1`, `bn1`, `layer{1,2,3}.{j}.…`).
"""

from __future__ import annotations

import torch
from torch import nn


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample (dim 0 = batch), rescale the survivors."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


def linspace_rates(rate: float, n: int) -> list[float]:
    """Drop-path schedule [0, …, rate] over n layers (pure Python: safe while building on the meta device)."""
    if n == 1:
        return [0.0]
    return [rate * i / (n - 1) for i in range(n)]


class DropPath(nn.Module):
    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 drop_path_rate: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # v1.5: the stride sits on the 3×3 conv
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(identity + self.drop_path(out))


class ResNetStem(nn.Module):
    """conv1 7×7/2 → BN → ReLU → maxpool 3×3/2 → layer1 → layer2 → layer3."""

    def __init__(self, blocks: tuple[int, int, int], drop_path_rate: float = 0.0):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(64, blocks[0], 1, drop_path_rate)
        self.layer2 = self._make_stage(128, blocks[1], 2, drop_path_rate)
        self.layer3 = self._make_stage(256, blocks[2], 2, drop_path_rate)
        self.reset_parameters()

    @property
    def out_channels(self) -> int:
        return 256 * Bottleneck.expansion

    def _make_stage(self, planes: int, n_blocks: int, stride: int, drop_path_rate: float) -> nn.Sequential:
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out))
        rates = linspace_rates(drop_path_rate, n_blocks)
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        layers += [Bottleneck(out, planes, drop_path_rate=rates[i]) for i in range(1, n_blocks)]
        return nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer3(self.layer2(self.layer1(x)))
