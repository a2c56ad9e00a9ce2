"""Out-of-fold scoring: each fold's held-out predictions, the tuned inference weights, report.json, plots.

Retrieval out of fold ranks within a fold: queries and gallery are that fold's held-out images,
each embedded by the model that never saw them. Grouped folds keep i2i partners together.

Two levels: a `FoldOOF` is what train.py saved for a fold (oof.npz); a `FoldView` is that fold after
the inference settings (head weight, per-track slerp alpha), which is what ranking and scoring read.
A blend (entrep/blend.py) mixes its members' views and is scored by the same functions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from entrep.engine import Embedded, retrieval_embedding
from entrep.io import atomic_path, atomic_write_csv, atomic_write_json
from entrep.metrics import classification_metrics, retrieval_metrics
from entrep.retrieval import method_params, rank_gallery, text_class_probs

OOF_FILE = "oof.npz"
RELEVANCE = {
    "i2i": "pair: a query's relevant set is its i2i partners (train/i2i.json links); gallery = the query's "
           "held-out fold minus the query",
    "t2i": "caption: a caption's relevant set is every held-out image carrying that caption line; gallery = "
           "the fold's held-out images",
}
TOPK = 10
TRACKS = ("i2i", "t2i")
# A method is offered only where it means something for the track. With caption queries, k-reciprocal
# would build one neighbour graph over text and image embeddings, whose modality gap leaves its
# Jaccard term without meaning, and alpha-QE would add image vectors to a caption's.
RERANK_OFFERED = {"i2i": ("dba", "qe", "class_bonus", "kreciprocal"), "t2i": ("dba", "class_bonus")}


@dataclass(frozen=True)
class FoldView:
    """One held-out fold (or a test folder) after the inference settings: what ranking and scoring read."""
    images: list[str]
    probs: np.ndarray                 # (N, C) class probabilities
    ret: dict[str, np.ndarray]        # track -> (N, D) unit retrieval embeddings
    captions: list[str]
    caption_emb: np.ndarray           # (Q, D) t2i queries, in the space of ret["t2i"]
    caption_probs: np.ndarray | None  # (Q, C) a caption's class distribution (class bonus), when prompts exist


@dataclass(frozen=True)
class FoldOOF:
    """One fold's held-out outputs as train.py saved them (oof.npz)."""
    images: list[str]
    e: Embedded
    captions: list[str]
    caption_emb: np.ndarray

    def view(self, head_weight: float, tta: bool, alpha: dict[str, float] | float = 0.0) -> FoldView:
        """The fold under these settings; `alpha` per track, or one value for both."""
        alpha = alpha if isinstance(alpha, dict) else dict.fromkeys(TRACKS, alpha)
        probs = self.e.probs(head_weight, tta)
        cp = (text_class_probs(torch.from_numpy(self.caption_emb), torch.from_numpy(self.e.class_emb)).numpy()
              if self.e.class_emb is not None and len(self.captions) else None)
        return FoldView(self.images, probs, {t: retrieval_embedding(self.e.emb, probs, self.e.class_emb, a)
                                             for t, a in alpha.items()}, self.captions, self.caption_emb, cp)


def save_fold_oof(path: Path, images: list[str], e: Embedded, captions: list[str], caption_emb: np.ndarray) -> None:
    """Everything needed to re-score a fold later, as plain arrays (loaded with allow_pickle=False)."""
    arrays = {"images": np.array(images, dtype=str), "emb": e.emb, "head": np.stack(e.head),
              "captions": np.array(captions, dtype=str), "caption_emb": caption_emb}
    if e.prompt is not None:
        arrays |= {"prompt": np.stack(e.prompt), "class_emb": e.class_emb}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_fold_oof(path: Path) -> FoldOOF:
    with np.load(path, allow_pickle=False) as z:
        e = Embedded(list(z["head"]), list(z["prompt"]) if "prompt" in z else None, z["emb"],
                     z["class_emb"] if "class_emb" in z else None)
        return FoldOOF(list(z["images"]), e, list(z["captions"]), z["caption_emb"])


def _rank(q: np.ndarray, g: np.ndarray, names: list[str], rerank: dict, exclude=None, pq=None,
          pg=None) -> list[list[str]]:
    exclude = None if exclude is None else torch.as_tensor(exclude)
    _, idx = rank_gallery(torch.from_numpy(q), torch.from_numpy(g), TOPK, rerank, exclude=exclude, pq=pq, pg=pg)
    return [[names[j] for j in row] for row in idx.tolist()]


def track_rankings(view: FoldView, table: pd.DataFrame, track: str, rerank: dict | None = None) -> tuple[list, list]:
    """(rankings, relevant sets) of one held-out fold's queries for one track."""
    images = view.images
    info = table.set_index("image").loc[images]
    ret = view.ret[track]
    pg = torch.from_numpy(view.probs)
    pos = {n: i for i, n in enumerate(images)}
    if track == "i2i":
        q = [i for i, p in enumerate(info["partners"]) if any(x in pos for x in p)]
        rel = [{x for x in info["partners"].iloc[i] if x in pos} for i in q]
        return (_rank(ret[q], ret, images, rerank or {}, exclude=q, pq=pg[q], pg=pg) if q else []), rel
    carriers: dict = {}
    for n, caps in zip(images, info["captions"]):
        for c in caps:
            carriers.setdefault(c, set()).add(n)
    keep = [i for i, c in enumerate(view.captions) if c in carriers]
    pt = torch.from_numpy(view.caption_probs[keep]) if view.caption_probs is not None and keep else None
    return ((_rank(view.caption_emb[keep], ret, images, rerank or {}, pq=pt, pg=pg) if keep else []),
            [carriers[view.captions[i]] for i in keep])


def pooled_retrieval(views: dict, table, track: str, rerank: dict | None = None) -> dict:
    """One track's retrieval metrics over the given folds' views, queries pooled."""
    rk, rel = [], []
    for v in views.values():
        r, s = track_rankings(v, table, track, rerank)
        rk += r
        rel += s
    return retrieval_metrics(rk, rel) if rk else {"n_queries": 0, "mrr": 0.0}


def pooled_classification(views: dict, table, names) -> dict:
    """Classification metrics over the labelled images of the given folds' views."""
    y_of = dict(zip(table["image"], table["y"]))
    y, pred = [], []
    for v in views.values():
        yy = np.array([y_of[n] for n in v.images])
        p = v.probs.argmax(1)
        y += list(yy[yy >= 0])
        pred += list(p[yy >= 0])
    return classification_metrics(y, pred, names) if y else {}


def tune_rerank(views: dict, table, track: str, rcfg) -> dict:
    """Greedy, in config order, over the methods offered for `track`: keep a method only where it
    raises the track's pooled MRR by rerank.min_gain (or keep every one when rerank.tune=false).
    rcfg: the RerankConfig."""
    kept: dict = {}
    current = pooled_retrieval(views, table, track, kept)["mrr"]
    steps = []
    for m in (m for m in rcfg.methods if m in RERANK_OFFERED[track]):
        trial = kept | {m: method_params(m, rcfg)}
        after = pooled_retrieval(views, table, track, trial)["mrr"]
        keep = not rcfg.tune or after >= current + rcfg.min_gain
        steps.append({"method": m, "params": trial[m], "mrr_before": current, "mrr_after": after, "kept": keep,
                      "why": ("listed (rerank.tune=false)" if not rcfg.tune else
                              f"{track} MRR {'+' if after >= current else ''}{after - current:.4f} "
                              f"vs required +{rcfg.min_gain}")})
        if keep:
            kept, current = trial, after
    return {"kept": kept, "steps": steps, "not_offered": [m for m in rcfg.methods if m not in RERANK_OFFERED[track]]}


def tune(oof: dict[int, FoldOOF], table, names, cfg) -> dict:
    """Inference settings chosen on the given folds' OOF predictions: the head-vs-prompt weight by
    macro F1, then per track the slerp alpha and the re-ranking methods by that track's MRR."""
    tta = cfg.infer.tta_flip
    has_prompt = all(f.e.prompt is not None for f in oof.values())
    grid_w = [0.0, 0.25, 0.5, 0.75, 1.0] if has_prompt else [1.0]
    f1 = {w: pooled_classification({k: f.view(w, tta) for k, f in oof.items()}, table, names).get("f1_macro", 0.0)
          for w in grid_w}
    w = max(grid_w, key=lambda v: (f1[v], v))
    out = {"head_weight": w, "tta_flip": tta, "head_weight_grid_f1_macro": {str(k): v for k, v in f1.items()}}
    grid_a = cfg.model.slerp.alpha_grid if has_prompt and cfg.model.slerp.infer else [0.0]
    for track in TRACKS:
        views = {a: {k: f.view(w, tta, {track: a}) for k, f in oof.items()} for a in grid_a}
        mrr = {a: pooled_retrieval(views[a], table, track)["mrr"] for a in grid_a}
        a = max(grid_a, key=lambda v: (mrr[v], -abs(v - cfg.model.slerp.alpha)))
        out[track] = {"alpha": a, "alpha_grid_mrr": {str(k): v for k, v in mrr.items()},
                      "rerank": tune_rerank(views[a], table, track, cfg.rerank)}
    return out


def track_settings(tuned: dict, track: str) -> tuple[float, dict]:
    """(alpha, kept re-ranking methods) of a track; tuned.json files from before per-track tuning
    held one alpha and one set for both tracks."""
    t = tuned.get(track) or {"alpha": tuned.get("alpha", 0.0), "rerank": tuned.get("rerank", {})}
    return t["alpha"], t["rerank"].get("kept", {})


HOW = {
    "classification": "pooled over folds: each image predicted by the fold model that never saw it, trained a "
                      "fixed train.epochs (no epoch picked on it), TTA as configured, head_weight tuned on the "
                      "other folds' OOF predictions (cross-fitted)",
    "i2i": "pooled over folds: queries and gallery from one held-out fold; slerp alpha and re-ranking tuned on the "
           "other folds' i2i MRR (cross-fitted)",
    "t2i": "pooled over folds: captions and gallery from one held-out fold; slerp alpha and re-ranking tuned on "
           "the other folds' t2i MRR (cross-fitted)",
    "folds": "stratified by class, grouped by the union of i2i components, patient ids and near-duplicate "
             "(pHash) clusters",
    "tuned": "tuned.json: the same tuning on all folds, for infer.py; it scores none of these figures",
}


@dataclass
class Scored:
    """One held-out fold, ready to score: its view, the per-track re-ranking and the settings that made
    them, all chosen without this fold."""
    view: FoldView
    rerank: dict[str, dict]
    settings: dict


def score_folds(scored: dict[int, Scored], table, names) -> dict:
    """The report's figures: per fold, and pooled over folds (classification over every labelled image,
    retrieval over every fold's queries)."""
    report = {"classification": pooled_classification({k: s.view for k, s in scored.items()}, table, names)}
    pooled = {t: ([], []) for t in TRACKS}
    rows = []
    for k, s in sorted(scored.items()):
        row = {"fold": k, "n_images": len(s.view.images), "settings": s.settings}
        c = pooled_classification({k: s.view}, table, names)
        row["n_labelled"] = c.get("n", 0)
        if c:
            row["classification"] = {m: c[m] for m in ("accuracy", "f1_macro", "f1_weighted")}
        for track in TRACKS:
            rk, rel = track_rankings(s.view, table, track, s.rerank[track])
            if rk:
                row[track] = retrieval_metrics(rk, rel)
            pooled[track][0].extend(rk)
            pooled[track][1].extend(rel)
        rows.append(row)
    for track in TRACKS:
        rk, rel = pooled[track]
        report[track] = (retrieval_metrics(rk, rel) if rk else {"n_queries": 0}) | {"relevance": RELEVANCE[track]}
    report["folds"] = rows
    return report


def crossfit(oof: dict[int, FoldOOF], table, names, cfg) -> tuple[dict, dict[int, Scored]]:
    """(report, scored folds): fold k is scored with settings tuned on the other folds, so no
    reported figure is chosen on the predictions it scores."""
    tta = cfg.infer.tta_flip
    scored = {}
    for k, fold in sorted(oof.items()):
        t = tune({j: f for j, f in oof.items() if j != k}, table, names, cfg)
        scored[k] = Scored(fold.view(t["head_weight"], tta, {tr: t[tr]["alpha"] for tr in TRACKS}),
                           {tr: t[tr]["rerank"]["kept"] for tr in TRACKS},
                           {"head_weight": t["head_weight"],
                            **{tr: {"alpha": t[tr]["alpha"], "rerank": list(t[tr]["rerank"]["kept"])}
                               for tr in TRACKS}})
    return score_folds(scored, table, names) | {"how": HOW}, scored


def oof_table(views: dict[int, FoldView], table, names) -> pd.DataFrame:
    """Every labelled image's OOF class probabilities, as scored in the report."""
    rows = []
    label_of = dict(zip(table["image"], table["label"]))
    for k, v in sorted(views.items()):
        for n, p in zip(v.images, v.probs):
            if pd.isna(label_of[n]):
                continue  # unlabelled images have embeddings in the fold's oof.npz, no class to score
            rows.append({"image": n, "fold": k, "label": label_of[n], "pred": names[int(p.argmax())],
                         **{f"p_{c}": float(x) for c, x in zip(names, p)}})
    return pd.DataFrame(rows)


def plots(run_dir: Path, cls: dict, names) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(cls["confusion"])
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(names), 1 + 0.7 * len(names)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title("out-of-fold confusion matrix")
    _save_fig(fig, run_dir / "confusion_matrix.png")
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(names), 3))
    ax.bar(names, [cls["per_class"][n]["f1"] for n in names])
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1 (out of fold)")
    ax.tick_params(axis="x", rotation=45)
    _save_fig(fig, run_dir / "per_class_f1.png")


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_report(run_dir: Path, oof: dict[int, FoldOOF], table, names, cfg) -> dict:
    report, scored = crossfit(oof, table, names, cfg)
    tuned = tune(oof, table, names, cfg) | {"how": HOW["tuned"]}
    return write_scored(run_dir, report | {"tuned": tuned}, tuned, scored, table, names)


def write_scored(run_dir: Path, report: dict, tuned: dict, scored: dict[int, Scored], table, names) -> dict:
    """tuned.json, oof.csv, report.json (last) and the plots of a run or a blend."""
    atomic_write_json(run_dir / "tuned.json", tuned)
    atomic_write_csv(run_dir / "oof.csv", oof_table({k: s.view for k, s in scored.items()}, table, names))
    atomic_write_json(run_dir / "report.json", report)
    if report["classification"]:
        plots(run_dir, report["classification"], names)
    return report


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
