"""Out-of-fold outputs: what a fold's model says of the images it never saw, its file, and how a
fold is ranked and scored.

Two levels: a `FoldOOF` is what train.py saved for a fold (oof.npz); a `FoldView` is that fold after
the inference settings (head weight, per-track slerp alpha), which is what ranking and scoring read.
A test folder at inference and a blend of runs are `FoldView`s too, ranked by the same code.

Retrieval out of fold ranks within a fold: queries and gallery are that fold's held-out images, each
embedded by the model that never saw them. Grouped folds keep i2i partners together.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from entrep.embedding import Embedded, retrieval_embedding
from entrep.io import atomic_path
from entrep.metrics import classification_metrics, retrieval_metrics
from entrep.retrieval import rank_gallery, text_class_probs

OOF_FILE = "oof.npz"
RETRIEVAL_TRACKS = ("i2i", "t2i")
OOF_TOPK = 10  # ranked answers kept per OOF query: Recall@10 is the deepest figure reported
RELEVANCE = {
    "i2i": "pair: a query's relevant set is its i2i partners (train/i2i.json links); gallery = the query's "
           "held-out fold minus the query",
    "t2i": "one target per caption, as the challenge scores it: each (caption line, image) pair of the held-out "
           "fold is one query whose only relevant image is that image, so a caption carried by k images is k "
           "queries and a ranker that cannot tell its carriers apart scores about 1/k; gallery = the fold's "
           "held-out images",
    "t2i_any": "NOT the challenge's rule, for comparison only: one query per caption line, answered by any held-out "
               "image carrying it; gallery = the fold's held-out images",
}


@dataclass(frozen=True)
class FoldView:
    """One held-out fold (or a test folder) after the inference settings: what ranking and scoring read."""
    images: list[str]
    probs: np.ndarray                 # (N, C) class probabilities
    ret: dict[str, np.ndarray]        # track -> (N, D) unit retrieval embeddings
    captions: list[str]
    caption_emb: np.ndarray           # (Q, D) t2i queries, in the space of ret["t2i"]
    caption_probs: np.ndarray | None  # (Q, C) a caption's class distribution (class bonus), when prompts exist
    text: bool = True                 # False: an image-only member (no text tower), which answers no t2i query


@dataclass(frozen=True)
class FoldOOF:
    """One fold's held-out outputs as train.py saved them (oof.npz)."""
    images: list[str]
    embedded: Embedded
    captions: list[str]
    caption_emb: np.ndarray
    text: bool = True  # False: an image-only member (no text tower)

    def view(self, head_weight: float, tta: bool, alpha: dict[str, float] | float = 0.0) -> FoldView:
        """The fold under these settings; `alpha` per track, or one value for both."""
        alpha = alpha if isinstance(alpha, dict) else dict.fromkeys(RETRIEVAL_TRACKS, alpha)
        e = self.embedded
        probs = e.probs(head_weight, tta)
        caption_probs = (text_class_probs(torch.from_numpy(self.caption_emb), torch.from_numpy(e.class_emb)).numpy()
                         if e.class_emb is not None and len(self.captions) else None)
        return FoldView(self.images, probs, {t: retrieval_embedding(e.emb, probs, e.class_emb, a)
                                             for t, a in alpha.items()}, self.captions, self.caption_emb,
                        caption_probs, self.text)


def save_fold_oof(path: Path, oof: FoldOOF) -> None:
    """Everything needed to re-score a fold later, as plain arrays (loaded with allow_pickle=False)."""
    e = oof.embedded
    arrays = {"images": np.array(oof.images, dtype=str), "emb": e.emb, "head": np.stack(e.head),
              "captions": np.array(oof.captions, dtype=str), "caption_emb": oof.caption_emb,
              "text": np.array(oof.text)}
    if e.prompt is not None:
        arrays |= {"prompt": np.stack(e.prompt), "class_emb": e.class_emb}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_fold_oof(path: Path) -> FoldOOF:
    with np.load(path, allow_pickle=False) as z:
        e = Embedded(list(z["head"]), list(z["prompt"]) if "prompt" in z else None, z["emb"],
                     z["class_emb"] if "class_emb" in z else None)
        return FoldOOF(list(z["images"]), e, list(z["captions"]), z["caption_emb"],
                       bool(z["text"]) if "text" in z else True)


def _rank(queries: np.ndarray, gallery: np.ndarray, names: list[str], rerank: dict, *, exclude=None,
          query_probs=None, gallery_probs=None) -> list[list[str]]:
    exclude = None if exclude is None else torch.as_tensor(exclude)
    _, idx = rank_gallery(torch.from_numpy(queries), torch.from_numpy(gallery), OOF_TOPK, rerank, exclude=exclude,
                          query_probs=query_probs, gallery_probs=gallery_probs)
    return [[names[j] for j in row] for row in idx.tolist()]


def track_rankings(view: FoldView, table: pd.DataFrame, track: str, rerank: dict | None = None,
                   rule: str | None = None) -> tuple[list, list]:
    """(rankings, relevant sets) of one held-out fold's queries for one track. t2i follows the
    challenge's rule (one query per (caption, image) pair); rule="t2i_any" scores the easier one
    (one query per caption, any carrier relevant) for comparison."""
    images = view.images
    info = table.set_index("image").loc[images]
    ret = view.ret[track]
    gallery_probs = torch.from_numpy(view.probs)
    pos = {n: i for i, n in enumerate(images)}
    if track == "i2i":
        q = [i for i, p in enumerate(info["partners"]) if any(x in pos for x in p)]
        rel = [{x for x in info["partners"].iloc[i] if x in pos} for i in q]
        return (_rank(ret[q], ret, images, rerank or {}, exclude=q, query_probs=gallery_probs[q],
                      gallery_probs=gallery_probs) if q else []), rel
    if not view.text:  # no text tower: no caption is answered (a blend takes t2i from its other members)
        return [], []
    carriers: dict = {}
    for n, caps in zip(images, info["captions"]):
        for c in caps:
            carriers.setdefault(c, []).append(n)
    keep = [i for i, c in enumerate(view.captions) if c in carriers]
    query_probs = torch.from_numpy(view.caption_probs[keep]) if view.caption_probs is not None and keep else None
    ranked = (_rank(view.caption_emb[keep], ret, images, rerank or {}, query_probs=query_probs,
                    gallery_probs=gallery_probs) if keep else [])
    if rule == "t2i_any":
        return ranked, [set(carriers[view.captions[i]]) for i in keep]
    # identical caption text ranks the same list once; each of its carriers is its own query
    pairs = [(r, n) for r, i in zip(ranked, keep) for n in carriers[view.captions[i]]]
    return [r for r, _ in pairs], [{n} for _, n in pairs]


def pooled_retrieval(views: dict, table, track: str, rerank: dict | None = None, rule: str | None = None) -> dict:
    """One track's retrieval metrics over the given folds' views, queries pooled."""
    rankings, relevant = [], []
    for v in views.values():
        r, s = track_rankings(v, table, track, rerank, rule)
        rankings += r
        relevant += s
    return retrieval_metrics(rankings, relevant) if rankings else {"n_queries": 0, "mrr": 0.0}


def pooled_classification(views: dict, table, names, present_only: bool = False) -> dict:
    """Classification metrics over the labelled images of the given folds' views; `present_only`:
    macro averages over the classes present in their truth only."""
    y_of = dict(zip(table["image"], table["y"]))
    y, pred = [], []
    for v in views.values():
        yy = np.array([y_of[n] for n in v.images])
        p = v.probs.argmax(1)
        y += list(yy[yy >= 0])
        pred += list(p[yy >= 0])
    return classification_metrics(y, pred, names, present_only=present_only) if y else {}
