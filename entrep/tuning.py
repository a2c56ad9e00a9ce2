"""Inference settings chosen on out-of-fold predictions, and cross-fitting.

`tune` picks the head-vs-prompt weight by macro F1, then per track the slerp alpha and the
re-ranking methods by that track's MRR. `crossfit` scores fold k with settings tuned on the other
folds only, so no reported figure is chosen on the predictions it scores; tuned.json (for infer.py)
is `tune` on all folds.
"""
from __future__ import annotations

from dataclasses import dataclass

from entrep.oof import RETRIEVAL_TRACKS, FoldOOF, FoldView, pooled_classification, pooled_retrieval
from entrep.retrieval import method_params

HEAD_WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
# A method is offered only where it means something for the track. With caption queries, k-reciprocal
# would build one neighbour graph over text and image embeddings, whose modality gap leaves its
# Jaccard term without meaning, and alpha-QE would add image vectors to a caption's.
RERANK_OFFERED = {"i2i": ("dba", "qe", "class_bonus", "kreciprocal"), "t2i": ("dba", "class_bonus")}


def offered_methods(rerank_cfg, track: str) -> dict:
    """rerank.methods as configured, less those not offered for the track, with their parameters."""
    return {m: method_params(m, rerank_cfg) for m in rerank_cfg.methods if m in RERANK_OFFERED[track]}


def tune_rerank(views: dict, table, track: str, rerank_cfg) -> dict:
    """Greedy, in config order, over the methods offered for `track`: keep a method only where it
    raises the track's pooled MRR by rerank.min_gain (or keep every one when rerank.tune=false)."""
    kept: dict = {}
    current = pooled_retrieval(views, table, track, kept)["mrr"]
    steps = []
    for m in (m for m in rerank_cfg.methods if m in RERANK_OFFERED[track]):
        trial = kept | {m: method_params(m, rerank_cfg)}
        after = pooled_retrieval(views, table, track, trial)["mrr"]
        keep = not rerank_cfg.tune or after >= current + rerank_cfg.min_gain
        steps.append({"method": m, "params": trial[m], "mrr_before": current, "mrr_after": after, "kept": keep,
                      "why": ("listed (rerank.tune=false)" if not rerank_cfg.tune else
                              f"{track} MRR {'+' if after >= current else ''}{after - current:.4f} "
                              f"vs required +{rerank_cfg.min_gain}")})
        if keep:
            kept, current = trial, after
    return {"kept": kept, "steps": steps,
            "not_offered": [m for m in rerank_cfg.methods if m not in RERANK_OFFERED[track]]}


def tune(oof: dict[int, FoldOOF], table, names, cfg) -> dict:
    """Inference settings chosen on the given folds' OOF predictions: the head-vs-prompt weight by
    macro F1, then per track the slerp alpha and the re-ranking methods by that track's MRR."""
    tta = cfg.infer.tta_flip
    has_prompt = all(f.embedded.prompt is not None for f in oof.values())
    grid_w = list(HEAD_WEIGHT_GRID) if has_prompt else [1.0]
    f1 = {w: pooled_classification({k: f.view(w, tta) for k, f in oof.items()}, table, names).get("f1_macro", 0.0)
          for w in grid_w}
    w = max(grid_w, key=lambda v: (f1[v], v))
    out = {"head_weight": w, "tta_flip": tta, "head_weight_grid_f1_macro": {str(k): v for k, v in f1.items()}}
    grid_a = cfg.model.slerp.alpha_grid if has_prompt and cfg.model.slerp.infer else [0.0]
    for track in RETRIEVAL_TRACKS:
        views = {a: {k: f.view(w, tta, {track: a}) for k, f in oof.items()} for a in grid_a}
        mrr = {a: pooled_retrieval(views[a], table, track)["mrr"] for a in grid_a}
        a = max(grid_a, key=lambda v: (mrr[v], -abs(v - cfg.model.slerp.alpha)))
        out[track] = {"alpha": a, "alpha_grid_mrr": {str(k): v for k, v in mrr.items()},
                      "rerank": tune_rerank(views[a], table, track, cfg.rerank)}
    return out


def track_settings(tuned: dict, track: str) -> tuple[float, dict]:
    """(alpha, kept re-ranking methods) of a track; tuned.json files from before per-track tuning
    held one alpha and one set for both tracks. Values of another type raise (io.kit_file names the file)."""
    t = tuned.get(track) or {"alpha": tuned.get("alpha", 0.0), "rerank": tuned.get("rerank", {})}
    return unit_float(t["alpha"], "alpha"), checked_rerank(t["rerank"].get("kept", {}))


def unit_float(x, what: str) -> float:
    """A weight read from a kit file: a number in [0, 1]."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x <= 1:
        raise ValueError(f"{what} is {x!r}, not a number in [0, 1]")
    return float(x)


def checked_rerank(kept) -> dict:
    """Re-ranking methods as a kit file holds them ({method: params}), each known and with the
    parameters the method takes, cast to their types."""
    from entrep.config import RerankConfig

    out = {}
    for m, params in dict(kept).items():
        want = method_params(m, RerankConfig())  # KeyError: not a method
        out[m] = {k: type(v)(params[k]) for k, v in want.items()}
    return out


@dataclass
class Scored:
    """One held-out fold, ready to score: its view, the per-track re-ranking and the settings that made
    them, all chosen without this fold."""
    view: FoldView
    rerank: dict[str, dict]
    settings: dict


def crossfit(oof: dict[int, FoldOOF], table, names, cfg) -> dict[int, Scored]:
    """Each fold with the settings tuned on the other folds."""
    tta = cfg.infer.tta_flip
    scored = {}
    for k, fold in sorted(oof.items()):
        t = tune({j: f for j, f in oof.items() if j != k}, table, names, cfg)
        scored[k] = Scored(fold.view(t["head_weight"], tta, {tr: t[tr]["alpha"] for tr in RETRIEVAL_TRACKS}),
                           {tr: t[tr]["rerank"]["kept"] for tr in RETRIEVAL_TRACKS},
                           {"head_weight": t["head_weight"],
                            **{tr: {"alpha": t[tr]["alpha"], "rerank": list(t[tr]["rerank"]["kept"])}
                               for tr in RETRIEVAL_TRACKS}})
    return scored
