"""Blending runs out of fold: several seeds, fusion modes or backbones, one submission
(`python -m entrep.blend`, entrep/commands/blend.py).

Members share their folds (a blend of runs whose folds differ is refused), so fold k of every member
held out the same images. Classification mixes the members' class probabilities. Each retrieval
track mixes their cosine similarities, as a weighted concatenation of the unit embeddings:
[sqrt(w1) u1, sqrt(w2) u2] . [sqrt(w1) v1, sqrt(w2) v2] = w1 u1.v1 + w2 u2.v2, one matrix product, on
which every re-ranking method works unchanged.

Weights are chosen per track (classification by macro F1, i2i and t2i by MRR) with greedy ensemble
selection with replacement (Caruana et al., ICML 2004): start from the best member, add one member
at a time, keep the best bag. It scales to many members where a weight grid does not. Re-ranking is
then tuned on the blend as for a run. The reported figures are cross-fitted: fold k is scored with
weights and re-ranking chosen on the other folds, over member settings (head weight, slerp alpha)
that were themselves tuned without fold k (each member's report.json).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from entrep import rundir
from entrep.config import load_config
from entrep.data.identity import data_identity, describe_data_change
from entrep.data.folds import read_folds
from entrep.errors import EntrepError
from entrep.io import atomic_files, changed_since, fingerprint, kit_file, read_json, shown
from entrep.model.checkpoint import fold_dir
from entrep.oof import (
    OOF_FILE,
    RETRIEVAL_TRACKS,
    FoldOOF,
    FoldView,
    load_fold_oof,
    pooled_f1_macro,
    pooled_retrieval,
)
from entrep.figures import image_paths, score_folds, write_scored
from entrep.page import write_page_into
from entrep.settings import Settings, fold_settings, read_blend_tuned, read_tuned
from entrep.tuning import Scored, tune_rerank

log = logging.getLogger("entrep.blend")

PARTS = ("cls", *RETRIEVAL_TRACKS)  # what gets its own weights
HOW = {
    "weights": "per track, greedy ensemble selection with replacement (Caruana et al. 2004) on the other folds' "
               "OOF predictions: classification by macro F1 over mixed probabilities, i2i and t2i by MRR over "
               "mixed similarities (weighted concatenation of unit embeddings)",
    "members": "each member's own figures, from its report.json (cross-fitted the same way)",
    "classification": "pooled over folds; fold k mixed with weights chosen on the other folds, each member's head "
                      "weight tuned without fold k (cross-fitted)",
    "i2i": "pooled over folds, queries and gallery from one held-out fold; weights and re-ranking chosen on the "
           "other folds, member slerp alphas tuned without fold k (cross-fitted)",
    "t2i": "as i2i, with the fold's captions as queries",
    "tuned": "tuned.json: weights and re-ranking chosen on all folds, member settings from their tuned.json; for "
             "infer.py, scores none of these figures",
}


class BlendError(EntrepError):
    pass


@dataclass
class Member:
    """A finished run, as a blend reads it: its folds' OOF outputs, its report and its tuned settings."""
    run: Path
    cfg: object
    oof: dict[int, FoldOOF]
    report: dict
    tuned: Settings

    @classmethod
    def load(cls, run: str | Path) -> Member:
        run = Path(run)
        if (run / rundir.BLEND).is_file():
            raise BlendError(f"{run} is a blend; blend its member runs instead")
        if not (run / rundir.CONFIG).is_file():
            raise BlendError(f"{run}: not a run directory (no config.yaml)")
        cfg = load_config(run / rundir.CONFIG)
        folds = {k: fold_dir(run, k) for k in range(cfg.cv.n_splits)}
        missing = [d.name for d in folds.values() if not (d / OOF_FILE).is_file()]
        tuned = read_tuned(run, cfg.infer.tta_flip)
        if missing or not (run / rundir.REPORT).is_file() or tuned is None:
            raise BlendError(f"{run}: no complete OOF report (missing {missing or 'report.json or tuned.json'}); "
                             f"finish its folds first: train.py --name {run.name} output_dir={run.parent} "
                             f"train.resume=true")
        return cls(run, cfg, {k: load_fold_oof(d / OOF_FILE) for k, d in folds.items()},
                   read_json(run / rundir.REPORT), tuned)

    def settings(self, held_out: int | None) -> Settings:
        """Tuned without fold `held_out` (the report's cross-fitted settings of that fold), or on all folds
        (tuned.json) when None; TTA as the member's settings were tuned with."""
        if held_out is None:
            return self.tuned
        s = fold_settings(self.run, held_out, self.tuned.tta_flip, self.report)
        if s is None:
            raise BlendError(f"{self.run}/report.json has no cross-fitted settings for fold {held_out} (written by an "
                             f"older entrep); retrain the run to blend it")
        return s

    def views(self, held_out: int | None) -> dict[int, FoldView]:
        kw = self.settings(held_out).view_kwargs()  # its own WiSE scales and memory weight too
        return {k: f.view(**kw) for k, f in self.oof.items()}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mix(views: list[FoldView], weights: dict[str, list[float]]) -> FoldView:
    """The members' views of one fold (or test folder) mixed: probabilities by weights["cls"], each
    track's embeddings concatenated with sqrt(weight) factors (cosine similarities mixed by
    weights[track]). Parts without weights are left out (ret) or taken from the first member. Captions
    and t2i come from the members with a text tower (an image-only member's t2i weight is 0)."""
    v0 = views[0]
    texts = [v for v in views if v.text]
    for v in views[1:]:
        if v.images != v0.images:
            raise BlendError("members disagree on the images of a fold; their folds differ")
    if any(v.captions != texts[0].captions for v in texts[1:]):
        raise BlendError("members disagree on the captions of a fold; their folds differ")
    if "t2i" in weights and any(x > 0 and not v.text for x, v in zip(weights["t2i"], views)):
        raise BlendError("a member without a text tower has a t2i weight")

    def cat(arrays, w):
        return np.concatenate([np.sqrt(x) * _unit(a) for a, x in zip(arrays, w) if x > 0], axis=1).astype(np.float32)

    probs = sum(x * v.probs for x, v in zip(weights["cls"], views)) if "cls" in weights else v0.probs
    ret = {t: cat([v.ret[t] for v in views], weights[t]) for t in RETRIEVAL_TRACKS if t in weights and any(weights[t])}
    v0 = texts[0] if texts else v0  # captions and their embeddings: a member that has them
    cap, cp = v0.caption_emb, v0.caption_probs
    if "t2i" in weights and any(weights["t2i"]) and len(v0.captions):
        cap = cat([v.caption_emb for v in views], weights["t2i"])
        # a caption's class distribution comes from the members with class prompts (the class bonus reads it)
        have = [(x, v.caption_probs) for x, v in zip(weights["t2i"], views) if v.caption_probs is not None and x > 0]
        cp = sum(x * p for x, p in have) / sum(x for x, _ in have) if have else None
    return FoldView(images=v0.images, probs=np.asarray(probs, np.float32), ret=ret, captions=v0.captions,
                    caption_emb=cap, caption_probs=cp, text=bool(texts))


def select(score, n: int, rounds: int) -> tuple[list[float], list[dict]]:
    """Greedy ensemble selection with replacement: each round adds the member whose addition scores
    best (ties: the first); the weights are the counts of the best bag seen (ties: the earlier bag,
    so a plateau keeps fewer members). Returns (weights, one trace row per round)."""
    counts = np.zeros(n, int)
    best, best_counts, trace = -np.inf, None, []
    for r in range(rounds):
        trial = [score((counts + np.eye(n, dtype=int)[i]) / (counts.sum() + 1)) for i in range(n)]
        i = int(np.argmax(trial))
        counts[i] += 1
        trace.append({"round": r + 1, "added": i, "score": float(trial[i])})
        if trial[i] > best + 1e-12:
            best, best_counts = trial[i], counts.copy()
    return [float(x) for x in best_counts / best_counts.sum()], trace


def choose(member_views: list[dict[int, FoldView]], folds: list[int], table, names, rerank_cfg, rounds: int) -> dict:
    """Weights per part and re-ranking per track, chosen on `folds` of the members' views."""
    n = len(member_views)

    def blended(w: dict) -> dict[int, FoldView]:
        return {j: mix([views[j] for views in member_views], w) for j in folds}

    weights, trace = {}, {}
    weights["cls"], trace["cls"] = select(
        lambda w: pooled_f1_macro(blended({"cls": w}), table, names), n, rounds)
    weights["i2i"], trace["i2i"] = select(lambda w: pooled_retrieval(blended({"i2i": w}), table, "i2i")["mrr"], n,
                                          rounds)
    # t2i among the members with a text tower; the others weigh 0 there
    have = [i for i, views in enumerate(member_views) if next(iter(views.values())).text]
    weights["t2i"], trace["t2i"] = [0.0] * n, []
    if have:
        def spread(w):
            out = np.zeros(n)
            out[have] = w
            return out

        w, trace["t2i"] = select(lambda w: pooled_retrieval(blended({"t2i": spread(w)}), table, "t2i")["mrr"],
                                 len(have), rounds)
        weights["t2i"] = [float(x) for x in spread(w)]
        for row in trace["t2i"]:
            row["added"] = have[row["added"]]
    full = blended(weights)
    return {"weights": weights, "selection": trace,
            **{t: {"rerank": tune_rerank(full, table, t, rerank_cfg)} for t in RETRIEVAL_TRACKS}}


def check_same_folds(members: list[Member]) -> pd.DataFrame:
    """The members' common folds.csv; refuses members whose folds or classes differ, naming the first
    image that differs."""
    first = members[0]
    folds = read_folds(first.run / rundir.FOLDS)
    fold_of = dict(zip(folds["image"], folds["fold"]))
    for m in members[1:]:
        if list(m.cfg.labels.names) != list(first.cfg.labels.names):
            raise BlendError(f"{m.run} and {first.run} have different classes")
        if (first.run / rundir.IDENTITY).is_file() and (m.run / rundir.IDENTITY).is_file():
            change = describe_data_change(read_json(first.run / rundir.IDENTITY)["data"],
                                          read_json(m.run / rundir.IDENTITY)["data"])
            if change:
                raise BlendError(f"{m.run} and {first.run} were trained on different data ({change}); a blend of "
                                 f"them would score each fold against two truths. Retrain one on the other's data")
        other = read_folds(m.run / rundir.FOLDS)
        theirs = dict(zip(other["image"], other["fold"]))
        for img in list(folds["image"]) + sorted(set(theirs) - set(fold_of)):
            if fold_of.get(img) != theirs.get(img):
                where = {r: "absent" if f is None else f"fold {f}" for r, f in ((first.run, fold_of.get(img)),
                                                                                (m.run, theirs.get(img)))}
                raise BlendError(f"{m.run} and {first.run} have different folds: first difference {img} "
                                 f"({first.run}: {where[first.run]}, {m.run}: {where[m.run]}). Retrain one with "
                                 f"cv.folds_from={first.run} (same data and cv settings share folds by default)")
    return folds


def member_figures(report: dict) -> dict:
    c = report.get("classification", {})
    return {"classification": {m: c[m] for m in ("accuracy", "f1_macro", "f1_weighted") if m in c},
            **{t: {m: v for m, v in report[t].items() if m != "relevance"} for t in RETRIEVAL_TRACKS}}


def crossfit_blend(members: list[Member], table, names, rounds: int = 20) -> tuple[dict, dict, dict[int, Scored]]:
    """(report, tuned, scored folds) of the blend of `members`, which must share folds."""
    rerank_cfg = members[0].cfg.rerank
    folds = sorted(members[0].oof)
    scored = {}
    for k in folds:
        member_views = [m.views(k) for m in members]
        others = [j for j in folds if j != k]
        chosen = choose(member_views, others, table, names, rerank_cfg, rounds)
        scored[k] = Scored(mix([v[k] for v in member_views], chosen["weights"]),
                           {t: chosen[t]["rerank"]["kept"] for t in RETRIEVAL_TRACKS},
                           {"weights": chosen["weights"],
                            **{t: {"rerank": list(chosen[t]["rerank"]["kept"])} for t in RETRIEVAL_TRACKS}})
        log.info("fold %d: weights %s (chosen on folds %s)", k,
                 {p: [round(x, 3) for x in w] for p, w in chosen["weights"].items()}, others)
    tuned = choose([m.views(None) for m in members], folds, table, names, rerank_cfg, rounds)
    # each member's own settings as the blend uses them: its re-ranking is not (the blend re-ranks the mix)
    tuned |= {"members": {str(m.run): m.settings(None).report_row() | {t: {"alpha": m.settings(None).track(t).alpha}
                                                                         for t in RETRIEVAL_TRACKS}
                          for m in members}, "how": HOW["tuned"]}
    report = score_folds(scored, table, names)
    report |= {"members": {str(m.run): member_figures(m.report) for m in members}, "tuned": tuned, "how": HOW}
    return report, tuned, scored


def member_refs(runs: list[str | Path], out: Path) -> list[str]:
    """How blend.json names its members: relative to the blend directory, so moving the whole
    runs/ folder keeps a blend working."""
    return [os.path.relpath(Path(r).resolve(), out.resolve()) for r in runs]


def member_sources(members: list[Member], out: Path) -> dict[str, str | None]:
    """What a blend is made from, fingerprinted in blend.json (named as `member_refs` names the runs):
    each member's config, tuned.json, folds and every fold's OOF outputs and metrics. A member retrained,
    re-scored or replaced under the same path changes one of them, and read_blend refuses the blend."""
    out_fp = {}
    for m, ref in zip(members, member_refs([m.run for m in members], out)):
        files = [rundir.CONFIG, rundir.TUNED, rundir.FOLDS]
        files += [f"{fold_dir(Path(), k)}/{name}" for k in sorted(m.oof) for name in (rundir.OOF_FILE,
                                                                                     rundir.METRICS_FILE)]
        out_fp |= {f"{ref}/{f}": fingerprint(m.run / f) for f in files}
    return out_fp


def load_members(runs: list[str | Path]) -> tuple[list[Member], pd.DataFrame]:
    """The finished runs and their common folds.csv; refuses what cannot be blended."""
    members = [Member.load(r) for r in runs]
    if len({m.run.resolve() for m in members}) < len(members):
        raise BlendError(f"a run is listed twice in --runs {[str(r) for r in runs]}")
    return members, check_same_folds(members)


def blend(members: list[Member], folds_df: pd.DataFrame, out: Path, table, names, rounds: int = 20) -> dict:
    """Blend the finished runs (`load_members`); write out/ (blend.json, tuned.json, report.json,
    oof.csv, folds.csv, plots) and return the report."""
    if missing := sorted(set(folds_df["image"]) - set(table["image"]))[:3]:
        raise BlendError(f"the runs' folds name images the release does not hold (e.g. {missing}); pass the "
                         f"release they were trained on with --data")
    for m in members:  # relevance and labels come from `table`: it must be what the members were scored on
        if (m.run / rundir.IDENTITY).is_file():
            if change := describe_data_change(read_json(m.run / rundir.IDENTITY)["data"], data_identity(table)):
                raise BlendError(f"the release given to the blend differs from what {m.run} was trained and scored on "
                                 f"({change}); pass that release with --data")
    report, tuned, scored = crossfit_blend(members, table, names, rounds)
    write_blend(out, folds_df, report, tuned, scored, table, names,
                {"members": member_refs([m.run for m in members], out), "rounds": rounds,
                 "rerank_config_from": str(members[0].run), "made_from": member_sources(members, out)})
    return report


def write_blend(out: Path, folds_df, report: dict, tuned: dict, scored: dict[int, Scored], table, names,
                spec: dict) -> None:
    """A blend directory's files as one unit (io.atomic_files): folds.csv, the report set, the page
    that shows them and blend.json, which is renamed in last; a failed write leaves the earlier blend whole."""
    with atomic_files(out) as files:
        files.write_csv(rundir.FOLDS, folds_df)  # infer.py reads it to name test images that are training images
        write_scored(files, report, tuned, scored, table, names)
        write_page_into(files, image_paths(table), blend=spec)
        files.write_json(rundir.BLEND, spec)  # renamed in last: it marks the blend complete


@dataclass
class Blend:
    """A blend directory as infer.py reads it."""
    members: list[Path]
    weights: dict[str, list[float]]
    rerank: dict[str, dict]

    def used(self) -> tuple[list[Path], dict[str, list[float]]]:
        """The members with a weight on some part, and their weights: a member the selection never
        picked is not embedded at all."""
        keep = [i for i in range(len(self.members)) if any(self.weights[p][i] > 0 for p in PARTS)]
        for i in set(range(len(self.members))) - set(keep):
            log.info("%s has weight 0 on every track: not embedded", shown(self.members[i]))
        return [self.members[i] for i in keep], {p: [self.weights[p][i] for i in keep] for p in PARTS}


def read_blend(path: Path) -> Blend:
    spec = read_json(path / rundir.BLEND)
    with kit_file(path / rundir.BLEND):
        refs = spec["members"]
        if not isinstance(refs, list) or not refs or not all(isinstance(m, str) and m for m in refs):
            raise TypeError(f"'members' is {refs!r}, not a list of run folders")
        members = [(path / m).resolve() for m in refs]
    weights, rerank = read_blend_tuned(path, PARTS, len(members))
    if missing := [m for m, p in zip(refs, members) if not (p / rundir.CONFIG).is_file()]:
        raise BlendError(f"{path}: member runs not found: {missing} (blend.json names them relative to the blend)")
    # a blend of an older kit recorded nothing to compare
    if changed := changed_since(path, spec.get("made_from", {}), path / rundir.BLEND):
        raise BlendError(f"{path}: its weights were chosen on member runs that have changed since ({changed[0]}: "
                         f"retrained, re-scored or replaced); re-blend: python -m entrep.blend --runs "
                         f"{' '.join(str(m) for m in members)} --name {path.name} --output-dir {path.parent}")
    return Blend(members, weights, rerank)
