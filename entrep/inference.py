"""Prediction as a library call: a run's folds ensembled on a test folder, with the flip TTA and
the tuned ranking, returned as data. `infer.py` writes what this returns; a notebook can call
`entrep.predict(run, test_dir, **overrides)` and get the same without subprocesses or files.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from entrep.config import ConfigError, load_config, parse_override
from entrep.errors import EntrepError

log = logging.getLogger("entrep.infer")


class RunError(EntrepError):
    pass


def fold_dirs(run: Path, cfg, partial: str) -> list[Path]:
    """The finished models on disk, whichever train.py calls made them: every fold of the run (and an
    all-data model when there is one). Unfinished folds are refused or skipped as infer.partial says."""
    from entrep.model.checkpoint import fold_finished  # imports torch: kept out of `infer.py --help`

    folds = [run / f"fold{k}" for k in range(cfg.cv.n_splits)]
    full = [run / "full"] if fold_finished(run / "full") else []
    done = [d for d in folds if fold_finished(d)] + full
    if not done:
        raise RunError(f"{run}: no finished fold (no fold*/metrics.json); train first or resume with train.resume=true")
    if full and len(done) == 1:
        return done  # an all-data model alone (train.folds=[-1])
    missing = [d.name for d in folds if not fold_finished(d)]
    if missing and partial == "refuse":
        raise RunError(f"{run}: folds {missing} are unfinished; finish them (train.resume=true) or pass "
                       f"infer.partial=use to ensemble only {[d.name for d in done]}")
    if missing:
        log.warning("ensembling %d finished folds only; unfinished: %s", len(done), missing)
    return done


def read_gallery(path: str, images: dict) -> list[str]:
    names = [s.strip() for s in Path(path).read_text(encoding="utf-8-sig").splitlines() if s.strip()]
    bad = [n for n in names if n not in images]
    if bad:
        raise RunError(f"{path}: gallery names not in the test folder: {bad[:5]}")
    return list(dict.fromkeys(names))


def training_overlap(run: Path, names: list[str], hashes: list[str]) -> dict:
    """Test images that are also training images, by file name and by content (the run's folds.csv)."""
    folds = pd.read_csv(run / "folds.csv", keep_default_na=False) if (run / "folds.csv").is_file() else None
    if folds is None:
        return {"by_name": [], "by_content": []}
    train_names = set(folds["image"])
    train_hashes = set(folds["sha1"]) if "sha1" in folds else set()
    return {"by_name": [n for n in names if n in train_names],
            "by_content": [n for n, h in zip(names, hashes) if h in train_hashes]}


def inference_settings(cfg, tuned: dict, given: set[str]) -> dict:
    """head_weight and per-track slerp alpha and re-ranking: the OOF-tuned values from tuned.json,
    except where the command line sets the key (infer.head_weight, model.slerp.alpha,
    model.slerp.infer, rerank.methods), which always wins."""
    from entrep.report import RERANK_OFFERED, track_settings
    from entrep.retrieval import method_params

    out = {"head_weight": cfg.infer.head_weight if cfg.infer.head_weight >= 0 or not tuned
           else tuned.get("head_weight", 0.5)}
    if out["head_weight"] < 0:
        out["head_weight"] = 0.5
    for track in ("i2i", "t2i"):
        alpha, kept = track_settings(tuned, track) if tuned else (cfg.model.slerp.alpha, {})
        if "model.slerp.alpha" in given:
            alpha = cfg.model.slerp.alpha
        if not cfg.model.slerp.infer:
            alpha = 0.0
        if "rerank.methods" in given:
            kept = {m: method_params(m, cfg.rerank) for m in cfg.rerank.methods if m in RERANK_OFFERED[track]}
        out[track] = {"alpha": alpha, "rerank": kept}
    return out


@dataclass
class Predictions:
    """What infer.py writes under runs/NAME/predictions/, as data."""
    classes: pd.DataFrame                 # image, pred, pred_idx, p_<class> for every test image
    i2i: dict[str, list[dict]]            # query -> [{"image", "score"}, ...], best first
    t2i: dict[str, list[dict]]            # caption -> the same
    meta: dict                            # folds, settings, gallery, queries, training overlap

    def rankings(self, track: str) -> pd.DataFrame:
        """One row per (query, rank): query, rank (1 = best), image, score."""
        rows = [{"query": q, "rank": r, "image": x["image"], "score": x["score"]}
                for q, ranked in getattr(self, track).items() for r, x in enumerate(ranked, 1)]
        return pd.DataFrame(rows, columns=["query", "rank", "image", "score"])

    def write(self, folder: Path) -> None:
        """classes.csv, i2i.json, t2i.json and meta.json, each written atomically (meta last)."""
        from entrep.io import atomic_write_csv, atomic_write_json

    
        atomic_write_csv(folder / "classes.csv", self.classes)
        atomic_write_json(folder / "i2i.json", self.i2i)
        atomic_write_json(folder / "t2i.json", self.t2i)
        atomic_write_json(folder / "meta.json", self.meta)


def predict(run: str | Path, test_dir: str | Path, overrides: list[str] | tuple = (), **kw) -> Predictions:
    """Ensemble the finished folds of `run` on `test_dir`: class probabilities and ranked i2i/t2i lists.

    Overrides as `key=value` strings or keywords with `__` for the dots
    (`predict(run, test, infer__topk=5)`); a key given here beats the value tuned on OOF.
    """
    run, test_dir = Path(run), Path(test_dir)
    overrides = list(overrides) + [f"{k.replace('__', '.')}={json.dumps(v) if not isinstance(v, str) else v}"
                                   for k, v in kw.items()]
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: not a run directory (no config.yaml)")
    cfg = load_config(run / "config.yaml", overrides)
    from entrep.model.backbone import set_offline

    set_offline(cfg.model.offline)
    import torch

    from entrep.data.images import ImageCache
    from entrep.data.release import file_hash, load_test
    from entrep.engine import embed_images, embed_texts, make_accelerator, retrieval_embedding
    from entrep.labels import LabelSet
    from entrep.model.backbone import image_stats
    from entrep.model.checkpoint import check_compatible, load_fold_weights, read_meta
    from entrep.model.entrep_clip import build_model
    from entrep.model.lora import merged
    from entrep.report import read_json
    from entrep.retrieval import average_embeddings, rank_gallery, text_class_probs

    labels = LabelSet.from_config(cfg.labels)
    dirs = fold_dirs(run, cfg, cfg.infer.partial)
    log.info("ensembling %s: the finished models on disk", ", ".join(d.name for d in dirs))
    for d in dirs:
        check_compatible(read_meta(d), cfg, d)
    tuned = read_json(run / "tuned.json") if (run / "tuned.json").is_file() else {}
    settings = inference_settings(cfg, tuned, {parse_override(o)[0] for o in overrides})
    head_weight = settings["head_weight"]
    if not tuned:
        log.warning("%s has no tuned.json (no complete OOF run): settings from the config: %s", run, settings)

    test = load_test(test_dir)
    if not (test.cls or test.i2i or test.t2i):
        raise RunError(f"{test_dir}: no query list (cls.csv, i2i.csv or t2i.csv) anywhere below it; nothing to "
                       f"predict, and {run / 'predictions'} is left as it is")
    for f, listed, disk in test.case_fixes:
        log.info("%s: query %r resolved to %r", f, listed, disk)
    names = sorted(test.images)
    gallery = read_gallery(cfg.infer.gallery, test.images) if cfg.infer.gallery else names
    test_hashes = [file_hash(test.images[n]) for n in names]
    in_training = training_overlap(run, names, test_hashes)
    if in_training["by_name"] or in_training["by_content"]:
        log.warning("%d test images are training images (by name: %d, e.g. %s; by content: %d, e.g. %s): in the "
                    "gallery they can be answers; to leave them out, list the gallery in infer.gallery=FILE",
                    len(set(in_training["by_name"]) | set(in_training["by_content"])), len(in_training["by_name"]),
                    in_training["by_name"][:3], len(in_training["by_content"]), in_training["by_content"][:3])
    log.info("gallery: %s (%d images)", f"infer.gallery={cfg.infer.gallery}" if cfg.infer.gallery else
             f"every image of {test_dir} (an i2i query never retrieves itself)", len(gallery))
    acc = make_accelerator(cfg)
    model = acc.prepare(build_model(cfg, labels))
    stats = image_stats(acc.unwrap_model(model).base)
    cache = ImageCache(cfg.image_cache_dir, cfg.data.working_side(stats.size))
    pixels = cache.pixels([str(test.images[n]) for n in names], test_hashes)

    probs_sum, rets, texts, text_probs = 0.0, {"i2i": [], "t2i": []}, [], []
    captions = test.t2i or []
    for d in dirs:
        load_fold_weights(acc.unwrap_model(model), d, adapter_name=d.name)
        with merged(acc.unwrap_model(model).clip) if cfg.infer.merge_lora else contextlib.nullcontext():
            e = embed_images(model, pixels, acc, cfg.train.eval_batch_size, cfg.infer.tta_flip, labels,
                             stats.size, stats.mean, stats.std)
            if captions:
                texts.append(torch.from_numpy(embed_texts(model, captions, acc)))
        probs = e.probs(head_weight, cfg.infer.tta_flip)
        probs_sum = probs_sum + probs
        for track in ("i2i", "t2i"):
            rets[track].append(torch.from_numpy(retrieval_embedding(e.emb, probs, e.class_emb,
                                                                    settings[track]["alpha"])))
        if captions and e.class_emb is not None:
            text_probs.append(text_class_probs(texts[-1], torch.from_numpy(e.class_emb)))
        log.info("embedded %d images with %s", len(names), d.name)
    probs = probs_sum / len(dirs)
    ret = {track: average_embeddings(r) for track, r in rets.items()}

    pos = {n: i for i, n in enumerate(names)}
    cls_df = pd.DataFrame({"image": names, "pred": [labels.names[i] for i in probs.argmax(1)],
                           "pred_idx": probs.argmax(1), **{f"p_{c}": probs[:, j] for j, c in enumerate(labels.names)}})
    g_idx = [pos[n] for n in gallery]
    g_pos = {n: i for i, n in enumerate(gallery)}
    k = cfg.infer.topk

    def ranked(scores, idx):
        return [[{"image": gallery[j], "score": round(float(s), 6)} for s, j in zip(sr, ir)]
                for sr, ir in zip(scores.tolist(), idx.tolist())]

    probs_t = torch.from_numpy(probs).float()

    def rank(track, queries, exclude=None, pq=None):
        return rank_gallery(queries, ret[track][g_idx], k, settings[track]["rerank"], exclude, pq, probs_t[g_idx],
                            cfg.infer.max_sim_bytes, cfg.infer.search, cfg.infer.faiss_nprobe)

    i2i = {}
    if test.i2i:
        q = [pos[test.on_disk[x]] for x in test.i2i]
        exclude = torch.tensor([g_pos.get(test.on_disk[x], -1) for x in test.i2i])
        s, i = rank("i2i", ret["i2i"][q], exclude, probs_t[q])
        i2i = dict(zip(test.i2i, ranked(s, i)))
    t2i = {}
    if captions:
        s, i = rank("t2i", average_embeddings(texts), None, sum(text_probs) / len(text_probs) if text_probs else None)
        t2i = dict(zip(captions, ranked(s, i)))
    meta = {
        "test_dir": str(test_dir.resolve()), "folds": [d.name for d in dirs], **settings,
        "tta_flip": cfg.infer.tta_flip, "topk": k, "gallery": gallery, "labels": list(labels.names),
        "queries": {"cls": test.cls, "i2i": test.i2i, "t2i": test.t2i}, "on_disk": test.on_disk,
        "test_images_in_training": in_training}
    return Predictions(cls_df, i2i, t2i, meta)
