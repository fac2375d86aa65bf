"""Pieces shared by both architectures: outputs, RMSNorm, weight initialisation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

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


def parameter_groups(model: nn.Module) -> dict:
    """Parameter counts by group: embeddings, ternary (BitLinear) weights, dense weights, norms and other."""
    from .hgrn_bit import BitLinear, FrozenBitLinear

    groups = {"embeddings": 0, "ternary": 0, "dense": 0, "norms": 0, "other": 0}
    ternary_ids = set()
    for m in model.modules():
        if isinstance(m, BitLinear):
            ternary_ids.add(id(m.weight))
        elif isinstance(m, FrozenBitLinear):
            groups["ternary"] += m.in_features * m.out_features
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in ternary_ids:
            groups["ternary"] += p.numel()
        elif "embed" in name:
            groups["embeddings"] += p.numel()
        elif "norm" in name:
            groups["norms"] += p.numel()
        elif p.dim() >= 2 and not name.endswith("lower_bounds"):
            groups["dense"] += p.numel()
        else:
            groups["other"] += p.numel()
    return groups
