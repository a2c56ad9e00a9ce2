"""Prediction as a library call: a run's folds ensembled on a test folder, with the flip TTA and
the tuned ranking, returned as data. `infer.py` writes what this returns; a notebook can call
`entrep.predict(run, test_dir, **overrides)` and get the same without subprocesses or files.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from entrep import rundir
from entrep.ensemble import mix, read_blend
from entrep.config import (SCORING_KEYS, ConfigError, load_config, override_item, parse_override, run_defining_diff,
                           shown_keys)
from entrep.data.images import ImageCache
from entrep.data.release import file_sha1, load_test
from entrep.embedding import eval_loader
from entrep.engine import make_accelerator
from entrep.errors import EntrepError
from entrep.data.folds import read_folds
from entrep.io import atomic_dir, atomic_write_csv, atomic_write_json, fingerprints, shown
from entrep.labels import LabelSet
from entrep.memory import MEMORY_FILE, Memory, load_memory
from entrep.model.backbone import base_weights_file, image_stats, set_offline
from entrep.model.checkpoint import check_compatible, fold_dir, fold_finished, load_fold_weights, verify_fold
from entrep.model.entrep_clip import build_model
from entrep.oof import RETRIEVAL_TRACKS, FoldOOF, FoldView
from entrep.retrieval import average_embeddings, rank_gallery
from entrep.settings import for_inference, offered_methods, read_tuned
from entrep.wise import embed_at, has_lora, start_state

log = logging.getLogger("entrep.infer")


class RunError(EntrepError):
    pass


def fold_dirs(run: Path, cfg, partial: str) -> list[Path]:
    """The finished models on disk, whichever train.py calls made them: every fold of the run (and an
    all-data model when there is one). Unfinished folds are refused or skipped as infer.partial says."""
    folds = [fold_dir(run, k) for k in range(cfg.cv.n_splits)]
    full = [fold_dir(run, -1)] if fold_finished(fold_dir(run, -1)) else []
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


def prediction_sources(run: Path, blend, members: list[Path], cfgs, folds: list[Path]) -> list[Path]:
    """The files predictions are made from, fingerprinted in their meta.json and compared by submit.py:
    a blend's blend.json and tuned.json; each member's config, tuned.json (recorded even when missing:
    one written later makes the predictions stale) and base weights file; the weights and meta of every
    fold ensembled (`folds`, as embed_members used them)."""
    files = [run / rundir.BLEND, run / rundir.TUNED] if blend else []
    for m, c in zip(members, cfgs):
        files += [m / rundir.CONFIG, m / rundir.TUNED]
        if (base := base_weights_file(c.model.pretrained)) is not None:
            files.append(base)
    for d in folds:
        adapter = d / rundir.ADAPTER_DIR
        files += [d / rundir.META_FILE, d / rundir.KIT_FILE] + ([adapter / rundir.ADAPTER_WEIGHTS]
                                                               if adapter.is_dir() else [])
    return files


def read_gallery(path: str, images: dict) -> list[str]:
    from entrep.data.release import read_query_lines

    names = read_query_lines(Path(path))
    bad = [n for n in names if n not in images]
    if bad:
        raise RunError(f"{path}: gallery names not in the test folder: {bad[:5]}")
    return list(dict.fromkeys(names))


def track_galleries(test, restrict: list[str] | None, gallery_file: str = "") -> dict[str, list[str]]:
    """Each retrieval track's gallery: the images of its query list's own folder (load_test), in the
    order of infer.gallery=FILE and only those it lists when given."""
    out = {}
    for track in RETRIEVAL_TRACKS:
        if not getattr(test, track):
            continue
        own = test.galleries[track]
        if restrict is not None:
            keep = set(own)
            own = [n for n in restrict if n in keep]
        if not own:
            raise RunError(f"{track}: empty gallery: infer.gallery={gallery_file} lists none of the images under "
                           f"{test.folders[track]}, where {track}.csv is")
        out[track] = own
    return out


def check_run_keys(run: Path, cfg) -> None:
    """Inference may override only the keys that steer one invocation or scoring (config.INVOCATION_KEYS,
    SCORING_KEYS): any other key defines what was trained, and a different value would be used
    silently beside the weights trained with the run's own (cv.n_splits=2 on a 3-fold run would drop
    fold 2; model.lora.rank would build adapters the folds do not hold)."""
    if diff := run_defining_diff(load_config(run / rundir.CONFIG), cfg):
        raise RunError(f"{run}: {', '.join(diff)} {'defines' if len(diff) == 1 else 'define'} the run (its config.yaml) "
                       f"and cannot be changed at inference; "
                       f"drop {'that override' if len(diff) == 1 else 'those overrides'} (inference takes "
                       f"{shown_keys(SCORING_KEYS)} and the keys of one invocation), or train a run with them under "
                       f"another --name")


def training_overlap(run: Path, names: list[str], hashes: list[str]) -> dict:
    """Test images that are also training images, by file name and by content (the run's folds.csv)."""
    folds = read_folds(run / rundir.FOLDS) if (run / rundir.FOLDS).is_file() else None
    if folds is None:
        return {"by_name": [], "by_content": []}
    train_names = set(folds["image"])
    train_hashes = set(folds["sha1"]) if "sha1" in folds else set()
    return {"by_name": [n for n in names if n in train_names],
            "by_content": [n for n, h in zip(names, hashes) if h in train_hashes]}


@dataclass
class Predictions:
    """What infer.py writes under runs/NAME/predictions/, as data."""
    classes: pd.DataFrame                 # image, pred, pred_idx, p_<class> for every test image
    i2i: dict[str, list[dict]]            # query -> [{"image", "score"}, ...], best first
    t2i: dict[str, list[dict]]            # caption -> the same
    meta: dict                            # folds, settings, gallery, queries, training overlap

    def rankings(self, track: str) -> pd.DataFrame:
        """One row per (query, rank): query, rank (1 = best), image, score; track "i2i" or "t2i"."""
        if track not in RETRIEVAL_TRACKS:
            raise ValueError(f"rankings({track!r}): rankings are of the retrieval tracks {RETRIEVAL_TRACKS}; the "
                             f"classification track is preds.classes (one row per image: pred, p_<class>)")
        rows = [{"query": q, "rank": r, "image": x["image"], "score": x["score"]}
                for q, ranked in getattr(self, track).items() for r, x in enumerate(ranked, 1)]
        return pd.DataFrame(rows, columns=["query", "rank", "image", "score"])

    FILES = rundir.PRED_FILES

    def write(self, folder: Path) -> None:
        """classes.csv, i2i.json, t2i.json and meta.json, written as one unit: a failed write (a full
        disk) leaves the earlier predictions whole, never one new file beside three old ones."""
        with atomic_dir(folder, set(self.FILES)) as tmp:
            atomic_write_csv(tmp / rundir.PRED_CLASSES, self.classes)
            atomic_write_json(tmp / rundir.PRED_RANKINGS["i2i"], self.i2i)
            atomic_write_json(tmp / rundir.PRED_RANKINGS["t2i"], self.t2i)
            atomic_write_json(tmp / rundir.PRED_META, self.meta)


def predict(run: str | Path, test_dir: str | Path, overrides: list[str] | tuple = (), **kw) -> Predictions:
    """Ensemble the finished folds of `run` (a run, or a blend of runs) on `test_dir`: class
    probabilities and ranked i2i/t2i lists.

    Overrides as `key=value` strings or keywords with `__` for the dots
    (`predict(run, test, infer__topk=5)`); a key given here beats the value tuned on OOF. On a blend
    they apply to every member.
    """
    run, test_dir = Path(run), Path(test_dir)
    overrides = list(overrides) + [override_item(k.replace("__", "."), v) for k, v in kw.items()]
    blend = read_blend(run) if (run / rundir.BLEND).is_file() else None
    if blend is None and not (run / rundir.CONFIG).is_file():
        raise ConfigError(f"{run}: not a run directory (no config.yaml) nor a blend ({rundir.BLEND})")
    members, weights = (blend.used() if blend else ([run], None))
    cfgs = [load_config(m / rundir.CONFIG, overrides) for m in members]
    for m, c in zip(members, cfgs):
        check_run_keys(m, c)
    cfg = cfgs[0]  # the ranking's own settings (infer.topk, infer.gallery, infer.search, ...)
    if cfg.infer.search.startswith("faiss-"):  # before any fold is embedded, not after
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise RunError(f"infer.search={cfg.infer.search} needs faiss: pip install faiss-cpu (or faiss-gpu), or "
                           f"use infer.search=torch") from None
    given = {parse_override(o)[0] for o in overrides}
    set_offline(cfg.model.offline)
    test = load_test(test_dir)
    if not (test.cls or test.i2i or test.t2i):
        raise RunError(f"{test_dir}: no query list (cls.csv, i2i.csv or t2i.csv) anywhere below it; nothing to "
                       f"predict, and no predictions are written")
    log_test_folder(test)  # before the galleries: a case fix can explain a gallery error
    names = sorted(test.images)
    galleries = track_galleries(test, read_gallery(cfg.infer.gallery, test.images) if cfg.infer.gallery else None,
                                cfg.infer.gallery)
    test_hashes = [file_sha1(test.images[n]) for n in names]
    in_training = training_overlap(run, names, test_hashes)
    log_galleries(test, in_training, galleries, cfg.infer.gallery)

    view, rerank, settings, used = embed_members(members, cfgs, blend, weights, test, names, test_hashes, given)
    folds = [f"{d.parent.name}/{d.name}" if blend else d.name for d in used]
    i2i, t2i = rank_test(view, test, galleries, rerank, cfg)
    not_predicted = {}
    if test.t2i and not view.text:
        not_predicted["t2i"] = f"{run} has no text tower (an image-only member): no t2i predictions"
        log.warning(not_predicted["t2i"])
    labels = LabelSet.from_config(cfg.labels).names
    pred = view.probs.argmax(1)
    cls_df = pd.DataFrame({"image": names, "pred": [labels[i] for i in pred], "pred_idx": pred,
                           **{f"p_{c}": view.probs[:, j] for j, c in enumerate(labels)}})
    meta = {
        "test_dir": str(test_dir.resolve()), "folds": folds, **settings, "topk": cfg.infer.topk,
        "galleries": {t: [test.spelling(t).get(n, n) for n in g] for t, g in galleries.items()},  # as answers spell them
        "gallery_folders": {t: str(test.folders[t]) for t in galleries}, "labels": list(labels),
        "queries": {"cls": test.cls, "i2i": test.i2i, "t2i": None if "t2i" in not_predicted else test.t2i},
        "not_predicted": not_predicted, "on_disk": test.on_disk, "test_images_in_training": in_training,
        "made_from": {"run": str(run.absolute()),
                      "files": fingerprints(run, prediction_sources(run, blend, members, cfgs, used))}}
    return Predictions(cls_df, i2i, t2i, meta)


def embed_members(members, cfgs, blend, weights, test, names, hashes, given) -> tuple[FoldView, dict, dict, list]:
    """(the test folder's view, the re-ranking per track, the settings used, the fold folders used) of a run, or
    of a blend's members mixed with its weights; a blend re-ranks the mix with its own methods, not a
    member's."""
    views, infos = [], []
    for m, c in zip(members, cfgs):
        v, info = embed_run(m, c, test, names, hashes, given)
        views.append(v)
        infos.append(info)
    used = [Path(i["run"]) / f for i in infos for f in i["folds"]]
    if not blend:
        settings = {k: v for k, v in infos[0].items() if k not in ("run", "folds")}
        return views[0], {t: settings[t]["rerank"] for t in RETRIEVAL_TRACKS}, settings, used
    rerank = {t: blend.rerank[t] for t in RETRIEVAL_TRACKS}
    if "rerank.methods" in given:
        rerank = {t: offered_methods(cfgs[0].rerank, t) for t in rerank}
    members_used = [{k: ({"alpha": v["alpha"]} if k in rerank else v) for k, v in i.items()} for i in infos]
    settings = {"members": members_used, "weights": weights, **{t: {"rerank": rerank[t]} for t in rerank}}
    return mix(views, weights), rerank, settings, used


def log_test_folder(test) -> None:
    """Files of the test folder left out or resolved by case."""
    if test.skipped:
        log.info("skipped %d macOS metadata files (._* AppleDouble files, __MACOSX folders), e.g. %s",
                 len(test.skipped), test.skipped[0])
    for f, listed, disk in test.case_fixes:
        log.info("%s: query %r resolved to %r", f, listed, disk)


def log_galleries(test, in_training: dict, galleries: dict, gallery_file: str) -> None:
    """Each track's gallery, and the test images that are training images."""
    if in_training["by_name"] or in_training["by_content"]:
        log.warning("%d test images are training images (by name: %d, e.g. %s; by content: %d, e.g. %s): in the "
                    "gallery they can be answers; to leave them out, list the gallery in infer.gallery=FILE",
                    len(set(in_training["by_name"]) | set(in_training["by_content"])), len(in_training["by_name"]),
                    in_training["by_name"][:3], len(in_training["by_content"]), in_training["by_content"][:3])
    for track, gallery in galleries.items():
        log.info("%s gallery: %s%s (%d images)%s", track, f"every image of {test.folders[track]}",
                 f", those listed in infer.gallery={gallery_file}" if gallery_file else "", len(gallery),
                 " (an i2i query never retrieves itself)" if track == "i2i" else "")


def embed_run(run: Path, cfg, test, names: list[str], hashes: list[str], given: set[str]):
    """(FoldView of the test images and captions, what was used): one run's finished folds and flip TTA,
    averaged; probabilities with the run's head weight, retrieval embeddings with its per-track alpha."""
    labels = LabelSet.from_config(cfg.labels)
    dirs = fold_dirs(run, cfg, cfg.infer.partial)
    for d in dirs:  # every file of every fold checked before the first is used
        check_compatible(verify_fold(d, cfg.model.lora.enabled), cfg, d)
    log.info("%s: ensembling %s, the finished models on disk", shown(run), ", ".join(d.name for d in dirs))
    tuned = read_tuned(run, cfg.infer.tta_flip)
    settings = for_inference(cfg, tuned, given)
    if tuned is None:
        log.warning("%s has no tuned.json (no complete OOF run): settings from the config: %s", run,
                    settings.as_dict())
    accelerator = make_accelerator(cfg)
    model = accelerator.prepare(build_model(cfg, labels))
    unwrapped = accelerator.unwrap_model(model)
    stats = image_stats(unwrapped.base)
    cache = ImageCache(cfg.image_cache_dir, cfg.data.working_side(stats.size))
    pixels = cache.pixels([str(test.images[n]) for n in names], hashes)

    loader = eval_loader(pixels, accelerator, cfg.train.eval_batch_size)  # prepared once, embedded by every fold
    captions = (test.t2i or []) if unwrapped.has_text else []
    wise = settings.wise
    memory_weight = settings.memory_weight if captions else 0.0
    # full fine-tuning interpolates with the backbone as built, before any fold is loaded (LoRA scales its delta)
    start = start_state(unwrapped) if any(s != 1.0 for s in wise.values()) and not has_lora(unwrapped) else None
    views = []
    for d in dirs:
        load_fold_weights(unwrapped, d, adapter_name=d.name)
        # WiSE scale -> (image outputs, caption embeddings): one pass per distinct scale, captions at t2i's
        out = {scale: embed_at(model, accelerator, labels, stats, loader, captions if scale == wise["t2i"] else [],
                               scale, start, settings.tta_flip, cfg.infer.merge_lora)
               for scale in dict.fromkeys([wise["cls"], *(wise[t] for t in RETRIEVAL_TRACKS)])}
        memory = fold_memory(d, wise["t2i"], memory_weight) if memory_weight > 0 else None
        fold = FoldOOF.of_scales(names, out, captions, unwrapped.has_text, memory)
        views.append(fold.view(**settings.view_kwargs() | {"memory_weight": memory_weight}, memory_held_out=True))
        log.info("embedded %d images with %s", len(names), d.name)
    return average_views(views), {"run": str(run), "folds": [d.name for d in dirs], **settings.as_dict()}


def average_views(views: list[FoldView]) -> FoldView:
    """The fold models' views of one test folder, ensembled: probabilities and caption class distributions
    averaged, retrieval and caption embeddings averaged as unit vectors."""
    v0 = views[0]
    texts = [torch.from_numpy(v.caption_emb) for v in views]
    return FoldView(
        images=v0.images, probs=sum(v.probs for v in views) / len(views),
        ret={t: average_embeddings([torch.from_numpy(v.ret[t]) for v in views]).numpy() for t in v0.ret},
        captions=v0.captions,
        caption_emb=average_embeddings(texts).numpy() if v0.captions else np.zeros((0, 1), np.float32),
        caption_probs=(sum(v.caption_probs for v in views) / len(views)) if v0.caption_probs is not None else None,
        text=v0.text)


def fold_memory(fold: Path, scale: float, weight: float) -> Memory:
    """A fold model's known-pair memory (memory.npz: every training image, embedded by this fold's model
    when it was trained), for infer.memory_weight; refused in one line where it lacks the scale."""
    memory = load_memory(fold / MEMORY_FILE)
    if memory is None or scale not in memory.scales:
        raise RunError(f"{fold}: no known-pair memory{'' if memory is None else f' at WiSE scale {scale}'} "
                       f"({MEMORY_FILE}) for infer.memory_weight={weight}; re-score the run with it: python train.py "
                       f"--name {fold.parent.name} output_dir={fold.parent.parent} train.resume=true "
                       f"infer.memory_weight=[...] (or infer.memory_weight=0)")
    return memory


def rank_test(view, test, galleries: dict[str, list[str]], rerank: dict[str, dict], cfg) -> tuple[dict, dict]:
    """The i2i and t2i rankings of a test folder's queries, each track over its own gallery (i2i
    queries never retrieve themselves). An i2i query whose gallery holds nothing but itself has no
    answer: refused in one line."""
    pos = {n: i for i, n in enumerate(view.images)}
    probs = torch.from_numpy(view.probs).float()

    def rank(track, queries, exclude=None, query_probs=None):
        gallery = galleries[track]
        spelled = test.spelling(track)  # answers spelled as the query lists spell them, keys too
        g_idx = [pos[n] for n in gallery]
        s, i = rank_gallery(queries, torch.from_numpy(view.ret[track][g_idx]), cfg.infer.topk, rerank[track],
                            exclude=exclude, query_probs=query_probs, gallery_probs=probs[g_idx],
                            max_bytes=cfg.infer.max_sim_bytes, search=cfg.infer.search, nprobe=cfg.infer.faiss_nprobe)
        return [[{"image": spelled.get(gallery[j], gallery[j]), "score": round(float(x), 6)} for x, j in zip(sr, ir)]
                for sr, ir in zip(s.tolist(), i.tolist())]

    i2i, t2i = {}, {}
    if test.i2i:
        g_pos = {n: i for i, n in enumerate(galleries["i2i"])}
        alone = [x for x in test.i2i if len(g_pos) - (test.on_disk[x] in g_pos) < 1]
        if alone:
            raise RunError(f"i2i query {alone[0]!r}: its gallery ({test.folders['i2i']}"
                           f"{', infer.gallery=' + cfg.infer.gallery if cfg.infer.gallery else ''}) holds nothing but "
                           f"the query itself, so it has no answer; an i2i gallery needs at least one other image")
        q = [pos[test.on_disk[x]] for x in test.i2i]
        exclude = torch.tensor([g_pos.get(test.on_disk[x], -1) for x in test.i2i])
        i2i = dict(zip(test.i2i, rank("i2i", torch.from_numpy(view.ret["i2i"][q]), exclude, probs[q])))
    if view.captions:
        caption_probs = None if view.caption_probs is None else torch.from_numpy(view.caption_probs).float()
        t2i = dict(zip(view.captions, rank("t2i", torch.from_numpy(view.caption_emb), None, caption_probs)))
    return i2i, t2i
