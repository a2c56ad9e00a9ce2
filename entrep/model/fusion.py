"""Multi-level fusion: one embedding per level (a CLS token through ln_post + proj, a pooled token set or
CNN stage through the tower's head or a learned projection) -> one embedding."""
from __future__ import annotations

import torch
from torch import nn


class CLSFusion(nn.Module):
    """Fuse L projected CLS embeddings (B, L, D) into (B, D).

    Both modes start at the last level, so step 0 reproduces CLIP's own image embedding and
    fine-tuning starts from CLIP's image-text alignment.
    - softmax: learned scalar per level, softmax-normalised; the last level's logit starts high.
    - concat: a linear map of the concatenated levels, initialised to pick the last level.
    """

    def __init__(self, n_levels: int, dim: int, mode: str = "softmax", final_logit: float = 4.0):
        super().__init__()
        self.mode = mode
        if mode == "softmax":
            init = torch.zeros(n_levels)
            init[-1] = final_logit
            self.level_logits = nn.Parameter(init)
        elif mode == "concat":
            self.proj = nn.Linear(n_levels * dim, dim, bias=False)
            with torch.no_grad():
                self.proj.weight.zero_()
                self.proj.weight[:, -dim:] = torch.eye(dim)
        else:
            raise ValueError(f"unknown fusion mode {mode!r}")

    @property
    def weights(self) -> torch.Tensor:
        return torch.softmax(self.level_logits, 0)

    def forward(self, levels: torch.Tensor) -> torch.Tensor:
        if self.mode == "softmax":
            return torch.einsum("bld,l->bd", levels, self.weights.to(levels.dtype))
        return self.proj(levels.flatten(1))


class StageProjection(nn.Module):
    """CNN stages before the last -> embedding width: global average pool, then a Linear per stage.

    A stage's channels differ from the final one's, so the tower's head cannot take it. The Linear starts
    at zero: the level adds nothing at step 0 (fused = CLIP's embedding) and learns from the first step.
    """

    def __init__(self, widths: list[int], dim: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(w, dim) for w in widths)
        for p in self.proj.parameters():
            nn.init.zeros_(p)

    def forward(self, stages: list[torch.Tensor]) -> list[torch.Tensor]:
        return [proj(x.mean((2, 3))) for proj, x in zip(self.proj, stages)]
