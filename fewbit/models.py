"""Small reference models: a CIFAR-style ResNet (:func:`resnet_small`) built from torch.nn
layers only, used by the tests and by ``fewbit bench --preset resnet`` as a CNN workload
(conv, BatchNorm, ReLU, max/avg pooling: every layer kind the compressed levels convert).
Nothing else of fewbit depends on it."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["BasicBlock", "ResNetSmall", "resnet_small"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut (1x1 conv-BN when the shape changes), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """CIFAR-style ResNet: stem conv-BN-ReLU, 3x3/2 max-pool, three stages of basic blocks
    (widths ``w, 2w, 4w``, strides 1, 2, 2), 4x4 average pool, linear classifier.

    Expects 32x32 inputs (the average pool covers the final 4x4 map).
    """

    def __init__(self, num_classes: int = 10, width: int = 16, blocks: int = 1,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers = []
        channels = width
        for stage, out in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(BasicBlock(channels, out, stride))
                channels = out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.layers(self.stem(x)))
        return self.fc(x.flatten(1))


def resnet_small(num_classes: int = 10, width: int = 16, blocks: int = 1) -> ResNetSmall:
    """A :class:`ResNetSmall` (about 0.2M parameters at the defaults)."""
    return ResNetSmall(num_classes, width, blocks)
