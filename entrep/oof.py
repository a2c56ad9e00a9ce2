"""Out-of-fold outputs: what a fold's model says of the images it never saw, its file, and how a
fold is ranked and scored.

Two levels: a `FoldOOF` is what train.py saved for a fold (oof.npz); a `FoldView` is that fold after
the inference settings (head weight, per-track slerp alpha), which is what ranking and scoring read.
A test folder at inference and a blend of runs are `FoldView`s too, ranked by the same code.

Retrieval out of fold ranks within a fold: queries and gallery are that fold's held-out images, each
embedded by the model that never saw them. Grouped folds keep i2i partners together.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from entrep.embedding import Embedded, retrieval_embedding
from entrep.errors import EntrepError
from entrep.io import atomic_path
from entrep.memory import MEMORY_FILE, Memory, embedded_arrays, embedded_from, load_memory, mix_queries, scale_key
from entrep.metrics import classification_metrics, f1_macro, retrieval_metrics
from entrep.retrieval import rank_gallery, text_class_probs
from entrep.rundir import OOF_FILE  # noqa: F401  (oof's file, named where every run file is)

RETRIEVAL_TRACKS = ("i2i", "t2i")
OOF_TOPK = 10  # ranked answers kept per OOF query: Recall@10 is the deepest figure reported
RELEVANCE = {
    "i2i": "pair: a query's relevant set is its i2i partners (train/i2i.json links); gallery = the query's "
           "held-out fold minus the query",
    "t2i": "per caption, as the leaderboard weighs it (one query, one target per caption): each (caption line, "
           "image) pair of the held-out fold is scored with that image as the only target, the pairs of a caption "
           "are averaged over its carriers, then the captions equally; a ranker that cannot tell a caption's k "
           "carriers apart scores about 1/k on it; gallery = the fold's held-out images",
    "t2i_pairs": "one target per (caption line, image) pair, every pair one query: a caption carried by k images "
                 "of the fold counts k times; gallery = the fold's held-out images",
    "t2i_any": "NOT the challenge's rule, for comparison only: one query per caption line, answered by any held-out "
               "image carrying it; gallery = the fold's held-out images",
}


@dataclass(frozen=True, kw_only=True)
class FoldView:
    """One held-out fold (or a test folder) after the inference settings: what ranking and scoring read."""
    images: list[str]
    probs: np.ndarray                 # (N, C) class probabilities
    ret: dict[str, np.ndarray]        # track -> (N, D) unit retrieval embeddings
    captions: list[str]
    caption_emb: np.ndarray           # (Q, D) t2i queries, in the space of ret["t2i"]
    caption_probs: np.ndarray | None  # (Q, C) a caption's class distribution (class bonus), when prompts exist
    text: bool = True                 # False: an image-only member (no text tower), which answers no t2i query


PARTS = ("cls", *RETRIEVAL_TRACKS)  # what gets its own WiSE scale


class MissingOutputs(EntrepError):
    pass


@dataclass(frozen=True, kw_only=True)
class FoldOOF:
    """One fold's held-out outputs as train.py saved them (oof.npz, and memory.npz beside it).

    `embedded` and `caption_emb` are the fold model as trained (WiSE scale 1.0); `scaled` holds the same
    outputs at the other WiSE scales of infer.wise_grid; `memory` the fold model's known-pair memory."""
    images: list[str]
    embedded: Embedded
    captions: list[str]
    caption_emb: np.ndarray
    text: bool = True  # False: an image-only member (no text tower)
    scaled: dict = field(default_factory=dict)  # WiSE scale (not 1.0) -> (Embedded, caption_emb)
    memory: Memory | None = None

    @property
    def scales(self) -> set[float]:
        return {1.0, *self.scaled}

    @classmethod
    def of_scales(cls, images: list[str], outputs: dict, captions: list[str], text: bool,
                  memory: Memory | None = None) -> FoldOOF:
        """A fold's outputs on other images (a test folder): `outputs` WiSE scale -> (image outputs,
        caption embeddings), only the scales that are used."""
        first = outputs.get(1.0, (None, None))
        return cls(images=images, embedded=first[0], captions=captions, caption_emb=first[1], text=text,
                   scaled={s: o for s, o in outputs.items() if s != 1.0}, memory=memory)

    def at(self, scale: float) -> tuple[Embedded, np.ndarray]:
        """(image outputs, caption embeddings) of the fold model at a WiSE scale."""
        if scale == 1.0 and self.embedded is not None:
            return self.embedded, self.caption_emb
        if scale not in self.scaled:
            raise MissingOutputs(f"this fold's OOF file holds no outputs at WiSE scale {scale} (it has "
                                 f"{sorted(self.scales)}); re-score the run with that scale in infer.wise_grid "
                                 f"(train.py --name RUN train.resume=true infer.wise_grid=[...]), which embeds it "
                                 f"from the saved fold weights")
        return self.scaled[scale]

    def view(self, head_weight: float, tta: bool, alpha: dict[str, float] | float = 0.0,
             wise: dict[str, float] | float | None = None, memory_weight: float = 0.0,
             memory_held_out: bool = False) -> FoldView:
        """The fold under these settings; `alpha` per track, or one value for both; `wise` the WiSE scale
        per part (cls, i2i, t2i) or one for all (default 1.0: as trained); `memory_weight` mixes the
        known-pair memory into the t2i queries: the other folds' carriers of a caption out of fold, every
        carrier (`memory_held_out`) on a test folder. The one place outputs and settings make a view:
        OOF scoring, blends and infer.py all come here."""
        alpha = alpha if isinstance(alpha, dict) else dict.fromkeys(RETRIEVAL_TRACKS, alpha)
        wise = wise if isinstance(wise, dict) else dict.fromkeys(PARTS, 1.0 if wise is None else wise)
        e, _ = self.at(wise.get("cls", 1.0))
        probs = e.probs(head_weight, tta)
        ret = {}
        for t, a in alpha.items():
            et, _ = self.at(wise.get(t, 1.0))
            ret[t] = retrieval_embedding(et.emb, probs if et is e else et.probs(head_weight, tta), et.class_emb, a)
        s_t2i = wise.get("t2i", 1.0)
        et, caption_emb = self.at(s_t2i)
        caption_probs = (text_class_probs(torch.from_numpy(caption_emb), torch.from_numpy(et.class_emb)).numpy()
                         if et.class_emb is not None and len(self.captions) else None)
        if memory_weight > 0 and len(self.captions):
            if self.memory is None:
                raise MissingOutputs("this fold has no known-pair memory (memory.npz); re-score the run with "
                                     "infer.memory_weight set (train.py --name RUN train.resume=true "
                                     "infer.memory_weight=[...]), which embeds it from the saved fold weights")
            if s_t2i not in self.memory.scales:
                raise MissingOutputs(f"this fold's memory holds no outputs at WiSE scale {s_t2i}; re-score the run "
                                     f"with it in infer.wise_grid")
            proto, has = self.memory.prototypes(self.captions, s_t2i, head_weight, tta, alpha.get("t2i", 0.0),
                                                include_held_out=memory_held_out)
            caption_emb = mix_queries(caption_emb, proto, has, memory_weight)
        return FoldView(images=self.images, probs=probs, ret=ret, captions=self.captions, caption_emb=caption_emb,
                        caption_probs=caption_probs, text=self.text)


def save_fold_oof(path: Path, oof: FoldOOF) -> None:
    """Everything needed to re-score a fold later, as plain arrays (loaded with allow_pickle=False). The
    model as trained keeps the original keys; other WiSE scales add keys suffixed `@scale`. The memory,
    when there is one, is saved by `save_memory` beside it (train_fold writes it for the all-data model too)."""
    e = oof.embedded
    arrays = {"images": np.array(oof.images, dtype=str), "emb": e.emb, "head": np.stack(e.head),
              "captions": np.array(oof.captions, dtype=str), "caption_emb": oof.caption_emb,
              "text": np.array(oof.text)}
    if e.prompt is not None:
        arrays |= {"prompt": np.stack(e.prompt), "class_emb": e.class_emb}
    if oof.scaled:
        arrays["wise_scales"] = np.array(sorted(oof.scales), dtype=np.float64)
    for s, (e, cap) in oof.scaled.items():
        arrays |= embedded_arrays(e, s) | {scale_key("caption_emb", s): cap}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_fold_oof(path: Path) -> FoldOOF:
    """A fold's OOF file (files from before WiSE hold scale 1.0 only) and its memory where it has one."""
    with np.load(path, allow_pickle=False) as z:
        e = embedded_from(z, 1.0)
        scales = [float(s) for s in z["wise_scales"]] if "wise_scales" in z else [1.0]
        scaled = {s: (embedded_from(z, s), z[scale_key("caption_emb", s)]) for s in scales if s != 1.0}
        return FoldOOF(images=list(z["images"]), embedded=e, captions=list(z["captions"]), caption_emb=z["caption_emb"],
                       text=bool(z["text"]) if "text" in z else True, scaled=scaled,
                       memory=load_memory(path.parent / MEMORY_FILE))


def _rank(queries: np.ndarray, gallery: np.ndarray, names: list[str], rerank: dict, *, exclude=None,
          query_probs=None, gallery_probs=None) -> list[list[str]]:
    exclude = None if exclude is None else torch.as_tensor(exclude)
    _, idx = rank_gallery(torch.from_numpy(queries), torch.from_numpy(gallery), OOF_TOPK, rerank, exclude=exclude,
                          query_probs=query_probs, gallery_probs=gallery_probs)
    return [[names[j] for j in row] for row in idx.tolist()]


T2I_RULES = ("t2i", "t2i_pairs", "t2i_any")


class Ranked(NamedTuple):
    """One held-out fold's queries for one track, ranked: what scoring and the report's failures read."""
    rankings: list          # each query's ranked gallery names (OOF_TOPK)
    relevant: list          # each query's set of right answers
    groups: list | None     # t2i: the caption each query weighs under (None: every query once)
    queries: list           # each query as the page shows it: an image name (i2i) or a caption (t2i)


def track_rankings(view: FoldView, table: pd.DataFrame, track: str, rerank: dict | None = None,
                   rule: str | None = None) -> Ranked:
    """One held-out fold's queries for one track, ranked (`Ranked`).
    t2i's rules (RELEVANCE): "t2i" (the default) one target per (caption, image) pair, grouped by
    caption so that `retrieval_metrics` weighs each caption once; "t2i_pairs" the same queries
    ungrouped; "t2i_any" one query per caption, any carrier relevant, for comparison."""
    images = view.images
    info = table.set_index("image").loc[images]
    ret = view.ret[track]
    gallery_probs = torch.from_numpy(view.probs)
    pos = {n: i for i, n in enumerate(images)}
    if track == "i2i":
        q = [i for i, p in enumerate(info["partners"]) if any(x in pos for x in p)]
        rel = [{x for x in info["partners"].iloc[i] if x in pos} for i in q]
        return Ranked(_rank(ret[q], ret, images, rerank or {}, exclude=q, query_probs=gallery_probs[q],
                            gallery_probs=gallery_probs) if q else [], rel, None, [images[i] for i in q])
    if not view.text:  # no text tower: no caption is answered (a blend takes t2i from its other members)
        return Ranked([], [], None, [])
    carriers: dict = {}
    for n, caps in zip(images, info["captions"]):
        for c in caps:
            carriers.setdefault(c, []).append(n)
    keep = [i for i, c in enumerate(view.captions) if c in carriers]
    query_probs = torch.from_numpy(view.caption_probs[keep]) if view.caption_probs is not None and keep else None
    ranked = (_rank(view.caption_emb[keep], ret, images, rerank or {}, query_probs=query_probs,
                    gallery_probs=gallery_probs) if keep else [])
    if rule == "t2i_any":
        return Ranked(ranked, [set(carriers[view.captions[i]]) for i in keep], None, [view.captions[i] for i in keep])
    # identical caption text ranks the same list once; each of its carriers is its own query
    pairs = [(r, n, view.captions[i]) for r, i in zip(ranked, keep) for n in carriers[view.captions[i]]]
    captions = [c for _, _, c in pairs]
    return Ranked([r for r, _, _ in pairs], [{n} for _, n, _ in pairs], None if rule == "t2i_pairs" else captions,
                  captions)


def pooled_retrieval(views: dict, table, track: str, rerank: dict | None = None, rule: str | None = None) -> dict:
    """One track's retrieval metrics over the given folds' views, queries pooled (t2i: a caption per
    fold is one group, weighed once)."""
    pooled = pooled_metrics({k: track_rankings(v, table, track, rerank, rule) for k, v in views.items()})
    return pooled if pooled is not None else {"n_queries": 0, "mrr": 0.0}


def pooled_metrics(per_fold: dict) -> dict | None:
    """Retrieval metrics of several folds' `Ranked` queries, pooled: a group (a t2i caption) is a fold's
    own, weighed once; None when no fold has a query."""
    rankings, relevant, groups = [], [], []
    for k, f in per_fold.items():
        rankings += f.rankings
        relevant += f.relevant
        groups += [(k, x) for x in f.groups] if f.groups is not None else [(k, "query", j) for j in range(len(f.rankings))]
    grouped = any(f.groups is not None for f in per_fold.values())
    return retrieval_metrics(rankings, relevant, groups=groups if grouped else None) if rankings else None


def pooled_labels(views: dict, table) -> tuple[np.ndarray, np.ndarray]:
    """(truth, predicted class) of the labelled images of the given folds' views, pooled."""
    y_of = dict(zip(table["image"], table["y"]))
    y, pred = [], []
    for v in views.values():
        yy = np.array([y_of[n] for n in v.images], dtype=np.int64)
        y.append(yy[yy >= 0])
        pred.append(v.probs.argmax(1)[yy >= 0])
    return (np.concatenate(y), np.concatenate(pred)) if y else (np.zeros(0, np.int64), np.zeros(0, np.int64))


def pooled_classification(views: dict, table, names, present_only: bool = False) -> dict:
    """Classification metrics over the labelled images of the given folds' views; `present_only`:
    macro averages over the classes present in their truth only."""
    y, pred = pooled_labels(views, table)
    return classification_metrics(y, pred, names, present_only=present_only) if len(y) else {}


def pooled_f1_macro(views: dict, table, names) -> float:
    """pooled_classification's f1_macro (0 without labelled images), computed alone: for the grids."""
    y, pred = pooled_labels(views, table)
    return f1_macro(y, pred, len(names)) if len(y) else 0.0
