"""Cosine top-k ranking in bounded memory, and fold/TTA ensembling of embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def average_embeddings(embs: list[torch.Tensor]) -> torch.Tensor:
    """Mean of unit embeddings over folds/views, renormalised."""
    return F.normalize(torch.stack([F.normalize(e.float(), dim=-1) for e in embs]).mean(0), dim=-1)


@torch.inference_mode()
def topk_cosine(queries: torch.Tensor, gallery: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
                max_bytes: int = 256 * 2**20) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices), each (Q, k'), k' = min(k, N [- 1 if excluding]), best first.

    Never holds a similarity block over `max_bytes`: queries are taken in chunks. `exclude[q]` is a
    gallery index to leave out for query q (the query itself), or -1.
    """
    q = F.normalize(queries.float(), dim=-1)
    g = F.normalize(gallery.float(), dim=-1)
    n = g.shape[0]
    k = min(k, n - (1 if exclude is not None and (exclude >= 0).any() else 0))
    rows = max(1, max_bytes // max(1, n * 4))
    scores, index = [], []
    for s in range(0, q.shape[0], rows):
        sim = q[s:s + rows] @ g.t()
        if exclude is not None:
            ex = exclude[s:s + rows].to(sim.device)
            hit = ex >= 0
            sim[hit.nonzero().squeeze(1), ex[hit]] = float("-inf")
        v, i = sim.topk(k, dim=1)
        scores.append(v)
        index.append(i)
    return torch.cat(scores), torch.cat(index)
