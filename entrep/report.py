"""Out-of-fold scoring: each fold's held-out predictions, the tuned inference weights, report.json, plots.

Retrieval out of fold ranks within a fold: queries and gallery are that fold's held-out images,
each embedded by the model that never saw them. Grouped folds keep i2i partners together.
"""
from __future__ import annotations

import json
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


def save_fold_oof(path: Path, images: list[str], e: Embedded, captions: list[str], caption_emb: np.ndarray) -> None:
    """Everything needed to re-score a fold later, as plain arrays (loaded with allow_pickle=False)."""
    arrays = {"images": np.array(images, dtype=str), "emb": e.emb, "head": np.stack(e.head),
              "captions": np.array(captions, dtype=str), "caption_emb": caption_emb}
    if e.prompt is not None:
        arrays |= {"prompt": np.stack(e.prompt), "class_emb": e.class_emb}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_fold_oof(path: Path) -> tuple[list[str], Embedded, list[str], np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        e = Embedded(list(z["head"]), list(z["prompt"]) if "prompt" in z else None, z["emb"],
                     z["class_emb"] if "class_emb" in z else None)
        return list(z["images"]), e, list(z["captions"]), z["caption_emb"]


def _rank(q: np.ndarray, g: np.ndarray, names: list[str], rerank: dict, exclude=None, pq=None,
          pg=None) -> list[list[str]]:
    exclude = None if exclude is None else torch.as_tensor(exclude)
    _, idx = rank_gallery(torch.from_numpy(q), torch.from_numpy(g), TOPK, rerank, exclude, pq, pg)
    return [[names[j] for j in row] for row in idx.tolist()]


def fold_retrieval(images, e: Embedded, captions, caption_emb, table: pd.DataFrame, head_weight: float,
                   alpha: float, tta: bool, rerank: dict | None = None) -> dict:
    """(rankings, relevant) for the fold's i2i and t2i queries."""
    rerank = rerank or {}
    info = table.set_index("image").loc[images]
    probs = e.probs(head_weight, tta)
    ret = retrieval_embedding(e.emb, probs, e.class_emb, alpha)
    pg = torch.from_numpy(probs)
    pos = {n: i for i, n in enumerate(images)}
    out = {}
    q = [i for i, p in enumerate(info["partners"]) if any(x in pos for x in p)]
    rel = [{x for x in info["partners"].iloc[i] if x in pos} for i in q]
    out["i2i"] = (_rank(ret[q], ret, images, rerank, exclude=q, pq=pg[q], pg=pg) if q else [], rel)
    carriers = {}
    for n, caps in zip(images, info["captions"]):
        for c in caps:
            carriers.setdefault(c, set()).add(n)
    keep = [i for i, c in enumerate(captions) if c in carriers]
    pt = (text_class_probs(torch.from_numpy(caption_emb[keep]), torch.from_numpy(e.class_emb))
          if e.class_emb is not None and keep else None)
    out["t2i"] = (_rank(caption_emb[keep], ret, images, rerank, pq=pt, pg=pg) if keep else [],
                  [carriers[captions[i]] for i in keep])
    return out


def score_run(oof: dict[int, tuple], table: pd.DataFrame, names, head_weight: float, alpha: float,
              tta: bool, rerank: dict | None = None) -> dict:
    """Per-fold and pooled OOF figures for classification, i2i and t2i."""
    y_of = dict(zip(table["image"], table["y"]))
    folds, pooled = [], {"y": [], "pred": [], "i2i": ([], []), "t2i": ([], [])}
    for k, (images, e, captions, caption_emb) in sorted(oof.items()):
        y = np.array([y_of[n] for n in images])
        pred = e.probs(head_weight, tta).argmax(1)
        lab = y >= 0
        row = {"fold": k, "n_images": len(images), "n_labelled": int(lab.sum())}
        if lab.any():
            c = classification_metrics(y[lab], pred[lab], names)
            row["classification"] = {m: c[m] for m in ("accuracy", "f1_macro", "f1_weighted")}
        pooled["y"] += list(y[lab])
        pooled["pred"] += list(pred[lab])
        for track, (rk, rel) in fold_retrieval(images, e, captions, caption_emb, table, head_weight, alpha,
                                               tta, rerank).items():
            if rk:
                row[track] = retrieval_metrics(rk, rel)
            pooled[track][0].extend(rk)
            pooled[track][1].extend(rel)
        folds.append(row)
    report = {"classification": classification_metrics(pooled["y"], pooled["pred"], names) if pooled["y"] else {}}
    for track in ("i2i", "t2i"):
        rk, rel = pooled[track]
        report[track] = (retrieval_metrics(rk, rel) if rk else {"n_queries": 0}) | {"relevance": RELEVANCE[track]}
    report["folds"] = folds
    return report


def mean_mrr(report: dict) -> float:
    mrrs = [report[t]["mrr"] for t in ("i2i", "t2i") if report[t].get("n_queries")]
    return float(np.mean(mrrs)) if mrrs else 0.0


def tune_rerank(oof, table, names, cfg, head_weight: float, alpha: float) -> dict:
    """Greedy, in config order: add each re-ranking method and keep it only where mean OOF MRR
    rises by rerank.min_gain (or keep every listed one when rerank.tune=false)."""
    tta = cfg.infer.tta_flip
    kept: dict = {}
    current = mean_mrr(score_run(oof, table, names, head_weight, alpha, tta, kept))
    steps = []
    for m in cfg.rerank.methods:
        trial = kept | {m: method_params(m, cfg.rerank)}
        after = mean_mrr(score_run(oof, table, names, head_weight, alpha, tta, trial))
        keep = not cfg.rerank.tune or after >= current + cfg.rerank.min_gain
        steps.append({"method": m, "params": trial[m], "mean_mrr_before": current, "mean_mrr_after": after,
                      "kept": keep, "why": ("listed (rerank.tune=false)" if not cfg.rerank.tune else
                                            f"OOF mean MRR {'+' if after >= current else ''}{after - current:.4f}"
                                            f" vs required +{cfg.rerank.min_gain}")})
        if keep:
            kept, current = trial, after
    return {"kept": kept, "steps": steps}


def tune(oof, table, names, cfg) -> dict:
    """Head-vs-prompt weight (OOF macro F1), then slerp alpha (mean OOF MRR of i2i and t2i), then
    which re-ranking methods to keep."""
    tta = cfg.infer.tta_flip
    has_prompt = all(e.prompt is not None for _, e, _, _ in oof.values())
    grid_w = [0.0, 0.25, 0.5, 0.75, 1.0] if has_prompt else [1.0]
    scores_w = {w: score_run(oof, table, names, w, 0.0, tta)["classification"].get("f1_macro", 0.0) for w in grid_w}
    w = max(grid_w, key=lambda v: (scores_w[v], v))
    grid_a = cfg.model.slerp.alpha_grid if has_prompt and cfg.model.slerp.infer else [0.0]
    scores_a = {a: mean_mrr(score_run(oof, table, names, w, a, tta)) for a in grid_a}
    a = max(grid_a, key=lambda v: (scores_a[v], -abs(v - cfg.model.slerp.alpha)))
    return {"head_weight": w, "alpha": a, "tta_flip": tta, "rerank": tune_rerank(oof, table, names, cfg, w, a),
            "grid": {"head_weight_f1_macro": {str(k): v for k, v in scores_w.items()},
                     "alpha_mean_mrr": {str(k): v for k, v in scores_a.items()}},
            "note": "chosen on the same out-of-fold predictions the report scores; never on test data"}


def oof_table(oof, table, names, head_weight: float, tta: bool) -> pd.DataFrame:
    rows = []
    label_of = dict(zip(table["image"], table["label"]))
    for k, (images, e, _, _) in sorted(oof.items()):
        probs = e.probs(head_weight, tta)
        for n, p in zip(images, probs):
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


def write_report(run_dir: Path, oof, table, names, cfg) -> dict:
    tuned = tune(oof, table, names, cfg)
    report = score_run(oof, table, names, tuned["head_weight"], tuned["alpha"], tuned["tta_flip"],
                       tuned["rerank"]["kept"])
    report["tuned"] = tuned
    atomic_write_json(run_dir / "tuned.json", tuned)
    atomic_write_csv(run_dir / "oof.csv", oof_table(oof, table, names, tuned["head_weight"], tuned["tta_flip"]))
    atomic_write_json(run_dir / "report.json", report)
    if report["classification"]:
        plots(run_dir, report["classification"], names)
    return report


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
