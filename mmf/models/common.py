"""Pieces shared by both architectures: outputs, RMSNorm, weight initialisation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmf import kernels


@dataclass
class ModelOutput:
    """``logits`` (B, T, V); ``cache`` continues the sequence when passed back with the next tokens."""

    logits: torch.Tensor
    cache: Any = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)


def init_weights(model: nn.Module, num_layers: int, std: float = 0.02) -> None:
    """GPT-2 style init: N(0, std) for projections and embeddings; the residual outputs
    (``o_proj``, ``down_proj``) scaled by 1/sqrt(2 L); norms at 1."""
    for name, p in model.named_parameters():
        if p.dim() < 2 or name.endswith("lower_bounds"):
            continue
        s = std / math.sqrt(2 * num_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
        with torch.no_grad():
            p.normal_(0.0, s)
