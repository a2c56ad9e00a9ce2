"""Cosine top-k ranking in bounded memory, and fold/TTA ensembling of embeddings."""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from entrep.config import MAX_SIM_BYTES
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
                max_bytes: int = MAX_SIM_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
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
            _mask(sim, exclude[s:s + rows])
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


def _rows_per_block(n_cols: int, max_bytes: int, per_col: int = 4) -> int:
    return max(1, max_bytes // max(1, n_cols * per_col))


def neighbour_average(x: torch.Tensor, pool: torch.Tensor, k: int, alpha: float, self_weight: float = 1.0,
                      exclude: torch.Tensor | None = None, max_bytes: int = MAX_SIM_BYTES) -> torch.Tensor:
    """normalise(self_weight·x + Σ_{top-k of pool} max(sim, 0)^alpha · pool_j), in row blocks whose
    similarity (and gathered neighbours) stay within `max_bytes`.

    alpha-QE (Radenović et al.) on queries; with alpha=0 and x from the pool, database-side augmentation.
    """
    k = min(k, pool.shape[0])
    rows = min(_rows_per_block(pool.shape[0], max_bytes, per_col=8), _rows_per_block(k * pool.shape[1], max_bytes))
    out = torch.empty_like(x)
    for s in range(0, x.shape[0], rows):
        sim = x[s:s + rows] @ pool.t()
        if exclude is not None:
            _mask(sim, exclude[s:s + rows])
        v, i = sim.topk(k, dim=1)
        w = v.clamp(min=0) ** alpha
        out[s:s + rows] = F.normalize(self_weight * x[s:s + rows] + torch.einsum("rk,rkd->rd", w, pool[i]), dim=-1)
    return out


def _mask(scores: torch.Tensor, exclude: torch.Tensor) -> None:
    """Set scores[r, exclude[r]] to -inf where exclude[r] >= 0 (the query's own gallery row)."""
    exclude = exclude.to(scores.device)
    hit = exclude >= 0
    scores[hit.nonzero().squeeze(1), exclude[hit]] = float("-inf")


class KReciprocal:
    """Zhong et al. (CVPR 2017) k-reciprocal re-ranking in memory bounded by `max_bytes` at any size.

    As in the authors' code: squared euclidean distances of unit vectors, each row divided by its
    maximum; k-reciprocal sets expanded by their half-size reciprocal sets when those overlap by
    more than 2/3; encodings V weighted by exp(-distance) and summing to 1, averaged over the k2
    nearest neighbours; Jaccard distance 1 - |min| / (2 - |min|) through an inverted index; final
    distance (1 - lam)·Jaccard + lam·distance. Neighbour lists come from a chunked top-k and V is
    sparse (a few dozen entries a row), so nothing of size (Q+N)² is ever held.
    """

    def __init__(self, q: torch.Tensor, g: torch.Tensor, k1: int = 20, k2: int = 6, lam: float = 0.3,
                 max_bytes: int = MAX_SIM_BYTES):
        from scipy.sparse import csr_matrix

        self.allf = torch.cat([q, g]).float()
        self.n_q, n = q.shape[0], self.allf.shape[0]
        self.lam, self.max_bytes = lam, max_bytes
        k1 = min(k1, n - 1)
        k2 = min(k2, k1 + 1)  # a tiny gallery has fewer neighbours than the local expansion asks for
        self.rowmax = torch.empty(n)
        rank = torch.empty(n, k1 + 1, dtype=torch.long)
        rows_per = _rows_per_block(n, max_bytes, per_col=8)  # the block and topk's workspace
        for s in range(0, n, rows_per):
            d = self._distances(self.allf[s:s + rows_per], self.allf)
            self.rowmax[s:s + len(d)] = d.max(1).values.clamp(min=1e-12)
            rank[s:s + len(d)] = d.topk(k1 + 1, dim=1, largest=False).indices  # self first
            del d
        rank_np = rank.numpy()
        half = int(round(k1 / 2)) + 1
        rows, cols, vals = [], [], []
        for i in range(n):
            fwd = rank_np[i]
            recip = fwd[(rank_np[fwd] == i).any(1)]  # j among i's k1+1 nearest, and i among j's
            expanded = [recip]
            for c in recip:
                cand = rank_np[c, :half]
                cand = cand[(rank_np[cand, :half] == c).any(1)]
                if len(np.intersect1d(cand, recip)) > 2 / 3 * len(cand):
                    expanded.append(cand)
            idx = np.unique(np.concatenate(expanded + [[i]]))  # i itself, even where ties with copies pushed it out
            d = self._pair_distance(i, idx)
            w = np.exp(-d)
            rows.append(np.full(len(idx), i))
            cols.append(idx)
            vals.append(w / w.sum())
        V = csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
        if k2 > 1:  # local query expansion: average each encoding over its k2 nearest neighbours
            pick = csr_matrix((np.full(n * k2, 1.0 / k2), (np.repeat(np.arange(n), k2), rank_np[:, :k2].ravel())),
                              shape=(n, n))
            V = pick @ V
        self.Vq, self.Vg = V[:self.n_q].tocsr(), V[self.n_q:].tocsc()

    @staticmethod
    def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Squared euclidean distances of unit rows, in place on one block: 2 - 2 cos."""
        return (a @ b.t()).mul_(-2).add_(2).clamp_(min=0)

    def _pair_distance(self, i: int, idx: np.ndarray) -> np.ndarray:
        # <= 1 by definition (the row's maximum); the clamp keeps rounding from making exp(-d) vanish
        # where every vector is a copy of one and the row maximum is ~0
        d = ((2 - 2 * self.allf[idx] @ self.allf[i]).clamp(min=0) / self.rowmax[i]).clamp(max=1)
        return d.numpy()

    def distances(self, s: int, e: int) -> torch.Tensor:
        """(e - s, N) final distances of queries s..e-1 to the gallery."""
        n_g = self.Vg.shape[0]
        inter = np.zeros((e - s, n_g), dtype=np.float32)
        block = self.Vq[s:e].tocoo()
        indptr, gal_rows, gal_vals = self.Vg.indptr, self.Vg.indices, self.Vg.data
        lengths = indptr[block.col + 1] - indptr[block.col]
        # the inverted index, vectorised: each query entry (r, c) meets every gallery entry of column c
        budget = max(1, self.max_bytes // 64)  # about 8 arrays of 8 bytes per pair below
        ends = np.cumsum(lengths)
        start = 0
        while start < len(lengths):
            stop = max(start + 1, int(np.searchsorted(ends, (ends[start - 1] if start else 0) + budget, "right")))
            ln = lengths[start:stop]
            offs = np.repeat(indptr[block.col[start:stop]] - np.concatenate([[0], np.cumsum(ln)[:-1]]), ln)
            at = np.arange(ln.sum()) + offs
            np.add.at(inter, (np.repeat(block.row[start:stop], ln), gal_rows[at]),
                      np.minimum(np.repeat(block.data[start:stop], ln), gal_vals[at]))
            start = stop
        inter = torch.from_numpy(inter)
        jaccard = inter.div_((2 - inter)).neg_().add_(1)  # 1 - |min| / (2 - |min|), in place
        orig = self._distances(self.allf[s:e], self.allf[self.n_q:]).div_(self.rowmax[s:e, None]).clamp_(max=1)
        return jaccard.mul_(1 - self.lam).add_(orig, alpha=self.lam)


def method_params(name: str, cfg) -> dict:
    """The configured parameters of one re-ranking method (cfg: RerankConfig)."""
    return {"dba": {"k": cfg.dba_k}, "qe": {"k": cfg.qe_k, "alpha": cfg.qe_alpha},
            "class_bonus": {"beta": cfg.class_beta},
            "kreciprocal": {"k1": cfg.k1, "k2": cfg.k2, "lam": cfg.lam}}[name]


def text_class_probs(text_emb: torch.Tensor, class_emb: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """A caption's class distribution: softmax over its similarity to the class prompts (CLIP's scale)."""
    return (scale * F.normalize(text_emb.float(), dim=-1) @ class_emb.float().t()).softmax(-1)


class Reranker:
    """The enabled re-ranking steps, scored one query block at a time.

    methods: {"dba": {"k"}, "qe": {"k", "alpha"}, "class_bonus": {"beta"}, "kreciprocal": {"k1", "k2", "lam"}}.
    DBA and alpha-QE replace the embeddings (chunked neighbour averages); k-reciprocal and the class
    bonus change the scores of each block. Every temporary stays within `max_bytes`.
    q_in_gallery[i] = gallery index of query i (i2i), so DBA moves the query with its gallery copy.
    query_probs / gallery_probs: (Q, C) / (N, C) class distributions, read by the class bonus.
    """

    def __init__(self, q: torch.Tensor, g: torch.Tensor, methods: dict, *, exclude: torch.Tensor | None = None,
                 query_probs: torch.Tensor | None = None, gallery_probs: torch.Tensor | None = None,
                 q_in_gallery: torch.Tensor | None = None, max_bytes: int = MAX_SIM_BYTES):
        q, g = F.normalize(q.float(), dim=-1), F.normalize(g.float(), dim=-1)
        if "dba" in methods:
            g = neighbour_average(g, g, methods["dba"]["k"], 0.0, self_weight=0.0, max_bytes=max_bytes)
            if q_in_gallery is not None:
                q = torch.where((q_in_gallery >= 0)[:, None], g[q_in_gallery.clamp(min=0)], q)
        if "qe" in methods:
            q = neighbour_average(q, g, methods["qe"]["k"], methods["qe"]["alpha"], exclude=exclude,
                                  max_bytes=max_bytes)
        self.q, self.g, self.exclude, self.max_bytes = q, g, exclude, max_bytes
        p = methods.get("kreciprocal")
        self.kr = KReciprocal(q, g, p["k1"], p["k2"], p["lam"], max_bytes) if p else None
        self.bonus = (methods["class_bonus"]["beta"], query_probs.float(), gallery_probs.float()) if (
            "class_bonus" in methods and query_probs is not None and gallery_probs is not None) else None

    def block_rows(self) -> int:
        """Query rows per block: the score block, its one same-sized temporary and topk's workspace."""
        return _rows_per_block(self.g.shape[0], self.max_bytes, per_col=12)

    def scores(self, s: int, e: int) -> torch.Tensor:
        """(e - s, N) scores of queries s..e-1, higher is better; excluded pairs get -inf."""
        out = self.kr.distances(s, e).neg_() if self.kr is not None else self.q[s:e] @ self.g.t()
        if self.bonus is not None:
            beta, query_probs, gallery_probs = self.bonus
            out.add_(query_probs[s:e] @ gallery_probs.t(), alpha=beta)
        if self.exclude is not None:
            _mask(out, self.exclude[s:e])
        return out


def rank_gallery(queries: torch.Tensor, gallery: torch.Tensor, k: int, rerank: dict | None = None, *,
                 exclude: torch.Tensor | None = None, query_probs: torch.Tensor | None = None,
                 gallery_probs: torch.Tensor | None = None, max_bytes: int = MAX_SIM_BYTES, search: str = "torch",
                 nprobe: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores, indices), best first, in blocks of queries that keep every temporary within
    `max_bytes`: re-ranked when methods are given, else cosine (`search`: torch, or faiss-flat|ivf|hnsw).
    `exclude[q]` is also the query's own gallery row (i2i)."""
    if not rerank and search.startswith("faiss-"):
        return faiss_topk(faiss_index(gallery, search.removeprefix("faiss-"), nprobe), queries, k, exclude)
    if not rerank:
        return topk_cosine(queries, gallery, k, exclude, max_bytes)
    # an i2i query's excluded gallery row is its own copy: DBA moves the query with it
    r = Reranker(queries, gallery, rerank, exclude=exclude, query_probs=query_probs, gallery_probs=gallery_probs,
                 q_in_gallery=exclude, max_bytes=max_bytes)
    k = min(k, len(gallery) - int(exclude is not None and bool((exclude >= 0).any())))
    rows = r.block_rows()
    blocks = [r.scores(s, min(s + rows, len(queries))).topk(k, dim=1) for s in range(0, len(queries), rows)]
    return torch.cat([b.values for b in blocks]), torch.cat([b.indices for b in blocks])
