"""The SAC head: a global pool then one linear classifier, read from an intermediate stage during training.
"""
from __future__ import annotations

import torch
from torch import nn

from .kinds import FLEXPOOL_KINDS, TOKEN_BASELINES
from .pools import make_pool
from .token_pool import TokenFlexPool, TokenPool


class SACHead(nn.Module):
    """Simple auxiliary classifier: a global pool (the module ``pool``) then one ``nn.Linear`` (``fc``).

    No convolutions, no hidden layers (the paper's SAC). On a token sequence (``layout="tokens"``)
    the pool is a TokenFlexPool over all tokens (for a baseline, their plain mean) and a LayerNorm
    comes before ``fc``: a transformer's stream between blocks is not normalised. The argument ``pool`` names its kind:
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
        *,
        layout: str = "nchw",
        prefix: int = 0,
        grid: tuple = (),
    ) -> None:
        super().__init__()
        self.layout = layout
        if layout == "tokens":  # all N tokens, started at their mean; normed, as a transformer's head is
            n = size[1]
            if pool in FLEXPOOL_KINDS:
                self.pool = TokenFlexPool(channels, n, ("mean", 0, n), grid=tuple(grid) or None, num_prefix=prefix,
                                          pool=pool, dropout=dropout)
            elif pool in TOKEN_BASELINES:  # a baseline's heads: the plain mean, where FlexPool's start
                self.pool = TokenPool(n, ("mean", 0, n), num_prefix=prefix, dropout=dropout)
            else:
                raise ValueError(f"a SAC head on tokens takes pool {', '.join(FLEXPOOL_KINDS + TOKEN_BASELINES)}, "
                                 f"not {pool!r}")
            self.norm = nn.LayerNorm(channels)
        else:  # a map has no class token: the 'token' baseline's heads average, as they do on tokens
            self.pool = make_pool("avg" if pool == "token" else pool, channels, size, dropout=dropout)
        self.fc = nn.Linear(channels, num_classes)

    def regularizer(self) -> torch.Tensor:
        return self.pool.regularizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "nhwc":  # a channels-last stage (Swin, MambaOut): pooled as the (B, C, H, W) view
            x = x.permute(0, 3, 1, 2)
        y = self.pool(x)
        return self.fc(self.norm(y) if self.layout == "tokens" else y)
