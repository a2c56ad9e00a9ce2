"""Cosine top-k ranking in bounded memory, and fold/TTA ensembling of embeddings."""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from entrep.errors import EntrepError

log = logging.getLogger("entrep.retrieval")


def average_embeddings(embs: list[torch.Tensor]) -> torch.Tensor:
    """Mean of unit embeddings over folds/views, renormalised."""
    return F.normalize(torch.stack([F.normalize(e.float(), dim=-1) for e in embs]).mean(0), dim=-1)


def unit(x: torch.Tensor) -> torch.Tensor:
    """x with unit rows; x itself when it already has them (a 1M-row gallery is 2 GB to copy)."""
    x = x.float()
    if x.numel() and (torch.linalg.vector_norm(x, dim=-1) - 1).abs().max() < 1e-4:  # no x-sized temporary
        return x
    return F.normalize(x, dim=-1)


@torch.inference_mode()
def topk_cosine(queries: torch.Tensor, gallery: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
                max_bytes: int = 256 * 2**20) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices), each (Q, k'), k' = min(k, N [- 1 if excluding]), best first.

    Never holds a similarity block over `max_bytes`: queries are taken in chunks. `exclude[q]` is a
    gallery index to leave out for query q (the query itself), or -1.
    """
    q, g = unit(queries), unit(gallery)
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


# ---------------------------------------------------------------- FAISS (optional)
FAISS_KINDS = ("flat", "ivf", "hnsw")


def faiss_index(gallery: torch.Tensor, kind: str = "flat", nprobe: int = 16, seed: int = 0):
    """An inner-product FAISS index over unit rows: `flat` is exact; `ivf` (sqrt-sized inverted
    lists, `nprobe` probed) and `hnsw` (M=32) are approximate."""
    try:
        import faiss
    except ImportError:
        raise EntrepError(f"infer.search=faiss-{kind} needs faiss: pip install faiss-cpu (or faiss-gpu), "
                          f"or use infer.search=torch") from None
    g = np.ascontiguousarray(unit(gallery).cpu().numpy())
    n, d = g.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = max(1, min(int(round(n ** 0.5)), n // 39))  # faiss wants >= 39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).choice(n, min(n, 64 * nlist), replace=False)
        index.train(g[np.sort(sample)])
        index.nprobe = min(nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    else:
        raise EntrepError(f"faiss index kind {kind!r}: choose from {FAISS_KINDS}")
    index.add(g)
    return index


def faiss_topk(index, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_cosine's contract on a FAISS index: best first, `exclude[q]` left out; slots an
    approximate index could not fill come back as index -1, score -inf."""
    excluding = exclude is not None and bool((exclude >= 0).any())
    k = min(k, index.ntotal - int(excluding))
    scores, idx = index.search(np.ascontiguousarray(unit(queries).cpu().numpy()), k + int(excluding))
    scores, idx = torch.from_numpy(scores), torch.from_numpy(idx)
    if excluding:
        drop = idx == exclude[:, None]
        drop[:, -1] |= ~drop.any(1)  # the excluded image was not among them: drop the extra slot
        order = drop.to(torch.int8).argsort(dim=1, stable=True)[:, :k]
        scores, idx = scores.gather(1, order), idx.gather(1, order)
    return scores.masked_fill(idx < 0, float("-inf")), idx


# ---------------------------------------------------------------- re-ranking
# Hand-written: open_clip, faiss and scikit-learn ship no query expansion or k-reciprocal re-ranking.

RERANK_METHODS = ("dba", "qe", "class_bonus", "kreciprocal")


def neighbour_average(x: torch.Tensor, pool: torch.Tensor, k: int, alpha: float, self_weight: float = 1.0,
                      exclude: torch.Tensor | None = None) -> torch.Tensor:
    """normalise(self_weight·x + Σ_{top-k of pool} max(sim, 0)^alpha · pool_j).

    alpha-QE (Radenović et al.) on queries; with alpha=0 and x from the pool, database-side augmentation.
    """
    sim = x @ pool.t()
    if exclude is not None:
        hit = exclude >= 0
        sim[hit.nonzero().squeeze(1), exclude[hit]] = float("-inf")
    s, i = sim.topk(min(k, pool.shape[0]), dim=1)
    w = s.clamp(min=0) ** alpha
    return F.normalize(self_weight * x + (w.unsqueeze(-1) * pool[i]).sum(1), dim=-1)


def k_reciprocal_distance(q: torch.Tensor, g: torch.Tensor, k1: int = 20, k2: int = 6, lam: float = 0.3) -> torch.Tensor:
    """Zhong et al. (CVPR 2017) re-ranking: (Q, N) distances mixing Jaccard distance of the
    k-reciprocal neighbour sets with the original distance (weight lam). Dense: O((Q+N)^2) memory."""
    allf = torch.cat([q, g])
    n_q, n = q.shape[0], allf.shape[0]
    dist = (2 - 2 * allf @ allf.t()).clamp(min=0)
    k1 = min(k1, n - 1)
    rank = dist.argsort(dim=1)
    V = torch.zeros(n, n, dtype=dist.dtype)
    for i in range(n):
        fwd = rank[i, :k1 + 1]
        recip = fwd[(rank[fwd, :k1 + 1] == i).any(1)]
        expanded = recip
        for c in recip.tolist():
            half = rank[c, :int(round(k1 / 2)) + 1]
            cand = half[(rank[half, :int(round(k1 / 2)) + 1] == c).any(1)]
            if len(set(cand.tolist()) & set(recip.tolist())) > 2 / 3 * len(cand):
                expanded = torch.cat([expanded, cand])
        expanded = expanded.unique()
        w = torch.exp(-dist[i, expanded])
        V[i, expanded] = w / w.sum()
    if k2 > 1:
        V = V[rank[:, :k2]].mean(1)
    inter = torch.minimum(V[:n_q, None, :], V[None, n_q:, :]).sum(-1)
    union = torch.maximum(V[:n_q, None, :], V[None, n_q:, :]).sum(-1)
    jaccard = 1 - inter / union.clamp(min=1e-12)
    return (1 - lam) * jaccard + lam * dist[:n_q, n_q:]


def method_params(name: str, cfg) -> dict:
    """The configured parameters of one re-ranking method (cfg: RerankConfig)."""
    return {"dba": {"k": cfg.dba_k}, "qe": {"k": cfg.qe_k, "alpha": cfg.qe_alpha},
            "class_bonus": {"beta": cfg.class_beta},
            "kreciprocal": {"k1": cfg.k1, "k2": cfg.k2, "lam": cfg.lam}}[name]


def text_class_probs(text_emb: torch.Tensor, class_emb: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """A caption's class distribution: softmax over its similarity to the class prompts (CLIP's scale)."""
    return (scale * F.normalize(text_emb.float(), dim=-1) @ class_emb.float().t()).softmax(-1)


def rerank_scores(q: torch.Tensor, g: torch.Tensor, methods: dict, exclude: torch.Tensor | None = None,
                  pq: torch.Tensor | None = None, pg: torch.Tensor | None = None,
                  q_in_gallery: torch.Tensor | None = None) -> torch.Tensor:
    """(Q, N) scores after the enabled re-ranking steps, higher is better; excluded pairs get -inf.

    methods: {"dba": {"k"}, "qe": {"k", "alpha"}, "class_bonus": {"beta"}, "kreciprocal": {"k1", "k2", "lam"}}.
    q_in_gallery[i] = gallery index of query i (i2i) so DBA moves the query with its gallery copy.
    """
    q, g = F.normalize(q.float(), dim=-1), F.normalize(g.float(), dim=-1)
    if "dba" in methods:
        g = neighbour_average(g, g, methods["dba"]["k"], 0.0, self_weight=0.0)  # top-k includes itself
        if q_in_gallery is not None:
            q = torch.where((q_in_gallery >= 0)[:, None], g[q_in_gallery.clamp(min=0)], q)
    if "qe" in methods:
        q = neighbour_average(q, g, methods["qe"]["k"], methods["qe"]["alpha"], exclude=exclude)
    if "kreciprocal" in methods:
        p = methods["kreciprocal"]
        scores = -k_reciprocal_distance(q, g, p["k1"], p["k2"], p["lam"])
    else:
        scores = q @ g.t()
    if "class_bonus" in methods and pq is not None and pg is not None:
        scores = scores + methods["class_bonus"]["beta"] * (pq.float() @ pg.float().t())
    if exclude is not None:
        hit = exclude >= 0
        scores[hit.nonzero().squeeze(1), exclude[hit]] = float("-inf")
    return scores


def rank_gallery(queries: torch.Tensor, gallery: torch.Tensor, k: int, rerank: dict | None = None,
                 exclude: torch.Tensor | None = None, pq: torch.Tensor | None = None, pg: torch.Tensor | None = None,
                 max_bytes: int = 256 * 2**20, search: str = "torch", nprobe: int = 16
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores, indices): re-ranked on a dense score matrix when methods are given and it fits
    `max_bytes`, else chunked cosine (`search`: torch, or faiss-flat|ivf|hnsw). `exclude[q]` is
    also the query's own gallery row (i2i)."""
    rerank = rerank or {}
    n_q, n_g = len(queries), len(gallery)
    need = 4 * ((n_q + n_g) ** 2 if "kreciprocal" in rerank else n_q * n_g)
    if rerank and need > max_bytes:
        log.warning("re-ranking %s skipped: it needs %.0f MiB, over the %.0f MiB bound", list(rerank),
                    need / 2**20, max_bytes / 2**20)
        rerank = {}
    if not rerank and search.startswith("faiss-"):
        return faiss_topk(faiss_index(gallery, search.removeprefix("faiss-"), nprobe), queries, k, exclude)
    if not rerank:
        return topk_cosine(queries, gallery, k, exclude, max_bytes)
    scores = rerank_scores(queries, gallery, rerank, exclude, pq, pg, exclude)
    return scores.topk(min(k, n_g - int(exclude is not None and bool((exclude >= 0).any()))), dim=1)
