"""The test technique's transform: the same network under a new name."""

from __future__ import annotations

import copy

from torch import nn


def rename(net: nn.Module, copies: int = 1) -> nn.Module:
    for _ in range(copies):
        net = copy.deepcopy(net)
    return net
