import sys

import pytest
import numpy as np
import torch
import torch.nn.functional as F

from entrep.errors import EntrepError
from entrep.retrieval import (KReciprocal, Reranker, average_embeddings, faiss_index, faiss_topk, neighbour_average,
                              rank_gallery, topk_cosine, unit)


def rerank_scores(q, g, methods, **kw):
    """All (Q, N) re-ranked scores at once (rank_gallery goes by blocks)."""
    return Reranker(q, g, methods, **kw).scores(0, q.shape[0])


def k_reciprocal_distance(q, g, k1=20, k2=6, lam=0.3):
    """(Q, N) k-reciprocal distances, dense."""
    return KReciprocal(q, g, k1, k2, lam).distances(0, q.shape[0])


def _v(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_chunked_topk_matches_bruteforce_argsort():
    g = torch.Generator().manual_seed(0)
    q, gal = torch.randn(37, 16, generator=g), torch.randn(501, 16, generator=g)
    exclude = torch.randint(-1, 501, (37,), generator=g)
    s, i = topk_cosine(q, gal, 10, exclude, max_bytes=501 * 4 * 3)  # three query rows per block
    sim = F.normalize(q, dim=-1) @ F.normalize(gal, dim=-1).t()
    for r in range(37):
        if exclude[r] >= 0:
            sim[r, exclude[r]] = float("-inf")
    want = sim.argsort(dim=1, descending=True)[:, :10]
    assert torch.equal(i, want)
    assert torch.allclose(s, sim.gather(1, want))
    assert not any(int(exclude[r]) in i[r].tolist() for r in range(37) if exclude[r] >= 0)


def test_unit_rows_are_not_copied():
    x = F.normalize(torch.randn(5, 8), dim=-1)
    assert unit(x) is x                       # already unit: no 2 GB copy of a 1M gallery
    y = 3 * x
    assert unit(y) is not y and torch.allclose(unit(y), x, atol=1e-6)


def test_faiss_exact_index_matches_the_torch_topk_with_exclusion():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    q, gal = torch.randn(40, 16, generator=g), torch.randn(300, 16, generator=g)
    exclude = torch.randint(-1, 300, (40,), generator=g)
    exclude[:5] = torch.topk(F.normalize(q[:5], dim=-1) @ F.normalize(gal, dim=-1).t(), 1).indices[:, 0]  # top-1
    s_t, i_t = topk_cosine(q, gal, 10, exclude)
    s_f, i_f = faiss_topk(faiss_index(gal, "flat"), q, 10, exclude)
    assert torch.equal(i_f, i_t) and torch.allclose(s_f, s_t, atol=1e-5)
    s_r, i_r = rank_gallery(q, gal, 10, None, exclude=exclude, search="faiss-flat")
    assert torch.equal(i_r, i_t)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_faiss_approximate_indexes_find_clustered_neighbours(kind):
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(40, 32, generator=g)
    gal = F.normalize(centres.repeat_interleave(100, 0) + 0.3 * torch.randn(4000, 32, generator=g), dim=-1)
    q = F.normalize(centres[:20] + 0.3 * torch.randn(20, 32, generator=g), dim=-1)
    _, exact = topk_cosine(q, gal, 10)
    _, approx = faiss_topk(faiss_index(gal, kind, nprobe=8), q, 10)
    recall = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact)) / exact.numel()
    assert recall >= 0.9, recall


def test_faiss_search_without_faiss_says_how_to_fix_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(EntrepError, match="pip install faiss-cpu"):
        rank_gallery(torch.randn(2, 4), torch.randn(5, 4), 3, search="faiss-flat")


def test_fold_average_is_renormalised():
    a, b = _v([1, 0], [0, 1])
    assert torch.allclose(average_embeddings([a[None], b[None]]), _v([1, 1]))


def test_alpha_qe_pulls_the_query_into_its_neighbourhood():
    q = _v([1.0, 0.0, 0.0])[0]
    gal = _v([0.95, 0.3, 0.0],   # a1: nearest to q
             [0.8, 0.0, 0.6],    # b: second by raw cosine
             [0.7, 0.7, 0.0])    # a2: a1's neighbour, third by raw cosine
    raw = rerank_scores(q[None], gal, {})[0]
    assert raw.argsort(descending=True).tolist() == [0, 1, 2]
    qe = rerank_scores(q[None], gal, {"qe": {"k": 1, "alpha": 1.0}})[0]
    assert qe.argsort(descending=True).tolist() == [0, 2, 1]


def test_dba_moves_gallery_items_toward_their_neighbours():
    gal = _v([1, 0], [0.9, 0.2], [0, 1])
    out = neighbour_average(gal, gal, 2, 0.0, self_weight=0.0)
    assert torch.allclose(out[0], F.normalize(gal[0] + gal[1], dim=0))
    q = _v([0.6, 0.8])
    raw = rerank_scores(q, gal, {})[0]
    dba = rerank_scores(q, gal, {"dba": {"k": 2}})[0]
    assert raw.argmax() == 2 and dba.argmax() == 2
    assert abs(float(dba[0] - dba[1])) < 1e-6  # DBA'd twins score the same


def test_class_bonus_breaks_ties_toward_the_same_predicted_class():
    q = _v([1, 0])
    gal = _v([0.8, 0.6], [0.8, -0.6])  # equally close
    pq = torch.tensor([[0.0, 1.0]])
    pg = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = rerank_scores(q, gal, {"class_bonus": {"beta": 0.1}}, query_probs=pq, gallery_probs=pg)[0]
    assert s.argmax() == 1 and torch.isclose(s[1] - s[0], torch.tensor(0.1))


def test_k_reciprocal_demotes_a_non_reciprocal_neighbour():
    torch.manual_seed(0)
    centre_a, centre_b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0.0, 0, 1, 0])
    cluster_a = F.normalize(centre_a + 0.15 * torch.randn(4, 4), dim=-1)
    cluster_b = F.normalize(centre_b + 0.15 * torch.randn(4, 4), dim=-1)
    outlier = F.normalize(torch.tensor([0.75, 0.0, 0.66, 0.0]), dim=0)  # between, belongs to B's side
    gal = torch.cat([cluster_a, outlier[None], cluster_b])
    q = F.normalize(centre_a + torch.tensor([0.0, 0, 0.45, 0]), dim=0)[None]
    raw = (q @ gal.t())[0]
    assert raw[4] > raw[:4].min()  # raw cosine ranks the outlier above a member of cluster A
    d = k_reciprocal_distance(q, gal, k1=4, k2=1, lam=0.3)[0]
    assert d[4] > d[:4].max()  # after re-ranking every A member comes first


def test_exclusion_survives_reranking():
    gal = _v([1, 0], [0.9, 0.1], [0, 1])
    s = rerank_scores(gal[:1], gal, {"qe": {"k": 1, "alpha": 1.0}, "dba": {"k": 2}}, exclude=torch.tensor([0]),
                      q_in_gallery=torch.tensor([0]))
    assert s[0, 0] == float("-inf") and s[0].argmax() == 1


def _zhong_reference(q, g, k1, k2, lam):
    """The authors' dense algorithm (re_ranking in Zhong et al.'s code), transcribed with numpy."""
    allf = torch.cat([q, g]).double().numpy()
    n_q, n = len(q), len(allf)
    dist = np.clip(2 - 2 * allf @ allf.T, 0, None)
    dist = (dist / dist.max(axis=0)).T
    rank = np.argsort(dist, axis=1, kind="stable")
    V = np.zeros((n, n))
    for i in range(n):
        fwd = rank[i, :k1 + 1]
        recip = fwd[np.where(rank[fwd, :k1 + 1] == i)[0]]
        expanded = recip
        for c in recip:
            cand_f = rank[c, :int(round(k1 / 2)) + 1]
            cand = cand_f[np.where(rank[cand_f, :int(round(k1 / 2)) + 1] == c)[0]]
            if len(np.intersect1d(cand, recip)) > 2 / 3 * len(cand):
                expanded = np.append(expanded, cand)
        expanded = np.unique(expanded)
        w = np.exp(-dist[i, expanded])
        V[i, expanded] = w / w.sum()
    if k2 > 1:
        V = np.stack([V[rank[i, :k2]].mean(0) for i in range(n)])
    inter = np.stack([np.minimum(V[i], V[n_q:]).sum(1) for i in range(n_q)])
    jaccard = 1 - inter / (2 - inter)
    return (1 - lam) * jaccard + lam * dist[:n_q, n_q:]


def test_k_reciprocal_matches_the_authors_dense_algorithm():
    g_ = torch.Generator().manual_seed(3)
    centres = F.normalize(torch.randn(6, 16, generator=g_), dim=-1)
    pts = F.normalize(centres[torch.arange(60) % 6] + 0.3 * torch.randn(60, 16, generator=g_), dim=-1)
    q, gal = pts[:12], pts[12:]
    ref = _zhong_reference(q, gal, k1=8, k2=3, lam=0.3)
    ours = k_reciprocal_distance(q, gal, k1=8, k2=3, lam=0.3).double().numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # and in tiny query blocks and pair budgets, the same numbers
    from entrep.retrieval import KReciprocal

    kr = KReciprocal(q, gal, 8, 3, 0.3, max_bytes=512)
    np.testing.assert_allclose(torch.cat([kr.distances(s, min(s + 5, 12)) for s in range(0, 12, 5)]).numpy(),
                               ref, atol=1e-5)


def test_reranking_memory_stays_within_the_bound_on_a_large_gallery(tmp_path):
    """Every method on 1,000 queries x 4,000 gallery images under a 16 MiB bound: the dense path held
    (Q+N)^2 distances plus a (Q, N, Q+N) temporary for k-reciprocal (80 GB here), and G x G for DBA."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import resource, torch, torch.nn.functional as F
from entrep.retrieval import rank_gallery
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
g = torch.Generator().manual_seed(0)
centres = F.normalize(torch.randn(50, 256, generator=g), dim=-1)
def pts(n): return F.normalize(centres[torch.randint(0, 50, (n,), generator=g)] + 0.5 * torch.randn(n, 256, generator=g), dim=-1)
methods = {"dba": {"k": 2}, "qe": {"k": 2, "alpha": 3.0}, "kreciprocal": {"k1": 20, "k2": 6, "lam": 0.3},
           "class_bonus": {"beta": 0.1}}
small_q, small_g = pts(50), pts(200)
rank_gallery(small_q, small_g, 10, methods, query_probs=torch.rand(50, 7), gallery_probs=torch.rand(200, 7),
             max_bytes=16 * 2**20)
q, gal, pq, pg = pts(1000), pts(4000), torch.rand(1000, 7), torch.rand(4000, 7)
before = rss()
s, i = rank_gallery(q, gal, 10, methods, query_probs=pq, gallery_probs=pg, max_bytes=16 * 2**20)
assert i.shape == (1000, 10)
from entrep.retrieval import topk_cosine
grew = rss() - before
assert not torch.equal(i, topk_cosine(q, gal, 10)[1]), "re-ranking was skipped, not bounded"
print(grew)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    grew = float(r.stdout.strip().splitlines()[-1])
    assert grew < 4 * 16, f"peak RSS grew by {grew:.0f} MiB under a 16 MiB bound"
