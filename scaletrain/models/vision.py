"""Small image classifiers for the digits corpus: an MLP and a residual CNN with batch norm.

Plain `nn.Module`s returning logits (B, num_classes). `init_weights(seed)` draws every
tensor from a generator seeded by (seed, parameter name), like the GPT, so the initial
weights do not depend on the device or on how the model is laid out.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from scaletrain.models.gpt import copy_into, seeded_generator


class VisionModel(nn.Module):
    """Shared initialisation: Kaiming-uniform weights (PyTorch's default), zero biases."""

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                values = torch.zeros(p.shape)
            elif p.dim() == 1:  # batch-norm scale
                values = torch.ones(p.shape)
            else:
                fan_in = p[0].numel()
                bound = 1.0 / math.sqrt(fan_in) * math.sqrt(3.0)  # He-uniform for ReLU nets
                values = torch.empty(p.shape).uniform_(-bound, bound,
                                                       generator=seeded_generator(seed, name))
            copy_into(p, values)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()


class MLP(VisionModel):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int,
                 dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity, then ReLU (He et al. 2016)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(x + self.bn2(self.conv2(y)))


class CNN(VisionModel):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: int,
                 n_blocks: int, dropout: float):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.ModuleDict({str(i): ResidualBlock(channels) for i in range(n_blocks)})
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks.values():
            x = block(x)
        return self.head(x)
