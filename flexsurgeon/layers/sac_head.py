"""The SAC head: a global pool then one linear classifier, read from an intermediate stage during training.
"""
from __future__ import annotations

import torch
from torch import nn

from .pools import make_pool


class SACHead(nn.Module):
    """Simple auxiliary classifier: a global pool (the module ``pool``) then one ``nn.Linear`` (``fc``).

    No convolutions, no hidden layers (the paper's SAC). The argument ``pool`` names its kind:
    FlexPool ("softmax", "linear"), or for ablation baselines another kind (see ``make_pool``).
    Used during training only; ``regularizer()`` returns the pool's regulariser (zero except
    for linear FlexPool).
    """

    def __init__(
        self,
        channels: int,
        size: tuple[int, int] | int,
        num_classes: int,
        pool: str = "softmax",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.pool = make_pool(pool, channels, size, dropout=dropout)
        self.fc = nn.Linear(channels, num_classes)

    def regularizer(self) -> torch.Tensor:
        return self.pool.regularizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))
