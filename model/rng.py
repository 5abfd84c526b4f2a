"""Per-seed random streams: each image draws only from its own seed's generator.

The reference draws, per seed and in this order: the latents, then one class label (whenever the
network is conditional, even if a class is then given), then the per-step churn noise. Matching
that order makes our images the reference's, and independent of which other seeds share a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class SeedStreams:
    """One torch.Generator per seed, stacked along the batch dimension."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.seeds = [int(seed) for seed in seeds]
        self.generators = [torch.Generator(device).manual_seed(seed % (1 << 32)) for seed in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], **kwargs: Any) -> Tensor:
        """Standard normal draws of `shape` = [len(seeds), ...], row k from seed k."""
        if shape[0] != len(self.generators):
            raise ValueError(f"batch dimension {shape[0]} != number of seeds {len(self.generators)}")
        return torch.stack([torch.randn(list(shape[1:]), generator=g, **kwargs) for g in self.generators])

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)

    def randint(self, high: int, **kwargs: Any) -> Tensor:
        """One integer in [0, high) per seed."""
        return torch.stack([torch.randint(high, size=[], generator=g, **kwargs) for g in self.generators])
