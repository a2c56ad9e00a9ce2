"""Spherical linear interpolation between unit vectors (batched, differentiable)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float, eps: float = 1e-4) -> torch.Tensor:
    """slerp(a, b, t) = sin((1-t)θ)/sinθ · a + sin(tθ)/sinθ · b, θ = arccos(a·b).

    a, b: (..., D), normalised here; t: scalar or broadcastable to (..., 1). Falls back to
    normalised lerp where θ ≈ 0, with the unused branch kept finite so gradients stay finite.
    """
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    if t.dim() == a.dim() - 1 and t.dim() > 0:
        t = t.unsqueeze(-1)
    dot = (a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7)
    theta = torch.acos(dot)
    sin = torch.sin(theta)
    near = sin < eps
    safe_sin = torch.where(near, torch.ones_like(sin), sin)
    wa = torch.where(near, 1 - t, torch.sin((1 - t) * theta) / safe_sin)
    wb = torch.where(near, t.expand_as(wa), torch.sin(t * theta) / safe_sin)
    return F.normalize(wa * a + wb * b, dim=-1)
