"""Inference settings chosen on out-of-fold predictions, and cross-fitting.

`tune` picks the head-vs-prompt weight (with the classification WiSE scale) by macro F1, then per track
the slerp alpha, WiSE scale and (t2i) known-pair memory weight, then the re-ranking methods, by that
track's MRR. `crossfit` scores fold k with settings tuned on the other
folds only, so no reported figure is chosen on the predictions it scores; tuned.json (for infer.py)
is `tune` on all folds.
"""
from __future__ import annotations

from dataclasses import dataclass

from entrep.oof import RETRIEVAL_TRACKS, FoldOOF, FoldView, pooled_f1_macro, pooled_retrieval
from entrep.retrieval import method_params
from entrep.settings import RERANK_OFFERED, Settings

HEAD_WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


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


def _wise_grid(cfg) -> list[float]:
    return sorted({float(x) for x in cfg.infer.wise_grid})


def tune(oof: dict[int, FoldOOF], table, names, cfg) -> dict:
    """Inference settings chosen on the given folds' OOF predictions: the head-vs-prompt weight and the
    classification WiSE scale by macro F1, then per track the slerp alpha and WiSE scale (and for t2i the
    known-pair memory weight) by that track's MRR, then its re-ranking methods. Ties prefer the model as
    trained (scale 1), no memory, and the head weight / alpha the config names."""
    tta = cfg.infer.tta_flip
    has_prompt = all(f.embedded.prompt is not None for f in oof.values())
    grid_w = list(HEAD_WEIGHT_GRID) if has_prompt else [1.0]
    grid_s = _wise_grid(cfg)
    f1 = {(s, w): pooled_f1_macro({k: f.view(w, tta, wise={"cls": s}) for k, f in oof.items()}, table, names)
          for s in grid_s for w in grid_w}
    s_cls, w = max(f1, key=lambda sw: (f1[sw], -abs(sw[0] - 1.0), sw[1]))
    out = {"head_weight": w, "tta_flip": tta, "head_weight_grid_f1_macro": {str(k): f1[(s_cls, k)] for k in grid_w},
           "wise": {"cls": s_cls}, "memory_weight": 0.0,
           "wise_grid_f1_macro": {str(k): f1[(k, w)] for k in grid_s}}
    grid_a = cfg.model.slerp.alpha_grid if has_prompt and cfg.model.slerp.infer else [0.0]
    text = all(f.text for f in oof.values())
    for track in RETRIEVAL_TRACKS:
        grid_m = sorted({float(x) for x in cfg.infer.memory_weight}) if track == "t2i" and text else [0.0]

        def views(s, a, m, track=track):
            return {k: f.view(w, tta, {track: a}, wise={"cls": s_cls, track: s}, memory_weight=m)
                    for k, f in oof.items()}

        mrr = {(s, a, m): pooled_retrieval(views(s, a, m), table, track)["mrr"]
               for s in grid_s for a in grid_a for m in grid_m}
        s, a, m = max(mrr, key=lambda c: (mrr[c], -abs(c[0] - 1.0), -c[2], -abs(c[1] - cfg.model.slerp.alpha)))
        out["wise"][track] = s
        if track == "t2i":
            out["memory_weight"] = m
        out[track] = {"alpha": a, "alpha_grid_mrr": {str(x): mrr[(s, x, m)] for x in grid_a},
                      "wise_grid_mrr": {str(x): mrr[(x, a, m)] for x in grid_s},
                      **({"memory_grid_mrr": {str(x): mrr[(s, a, x)] for x in grid_m}} if track == "t2i" else {}),
                      "rerank": tune_rerank(views(s, a, m), table, track, cfg.rerank)}
    return out


@dataclass
class Scored:
    """One held-out fold, ready to score: its view, the per-track re-ranking and the settings that made
    them (report.json's folds[k].settings), all chosen without this fold."""
    view: FoldView
    rerank: dict[str, dict]
    settings: dict


def crossfit(oof: dict[int, FoldOOF], table, names, cfg) -> dict[int, Scored]:
    """Each fold with the settings tuned on the other folds."""
    scored = {}
    for k, fold in sorted(oof.items()):
        s = Settings.from_tuning(tune({j: f for j, f in oof.items() if j != k}, table, names, cfg))
        scored[k] = Scored(view=fold.view(**s.view_kwargs()), rerank={t: s.track(t).rerank for t in RETRIEVAL_TRACKS},
                           settings=s.report_row())
    return scored
