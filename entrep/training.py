"""A run's training lifecycle: the run's data (release, decoded images, folds), its identity, one
fold (build -> fit -> OOF embedding -> save, metrics.json last) and the report once every fold is done.

    data = load_run_data(cfg, accelerator)        # the release, its pixels and its frozen folds
    claim_run(cfg)                                # the run's defining config, written once
    result = train_fold(cfg, accelerator, data, k)
    report = finish_run(cfg, data)                # None until every fold has finished

`commands/train.py` (train.py) runs this for `train.folds`; `entrep.train_fold(run, k)` for a notebook.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, gather_object, set_seed

from entrep import rundir
from entrep.cli import raise_if_interrupted
from entrep.config import PER_MACHINE_KEYS, Config, flat_dict, in_keys, load_config, recipe_switches, run_defining_diff, save_config, to_dict
from entrep.data.folds import (describe_shape, file_signatures, grouping_shape, load_or_make_folds, missing_classes,
                                 read_folds)
from entrep.data.near_dup import near_duplicate_pairs
from entrep.data.identity import data_identity, describe_data_change
from entrep.data.images import CachedPixels, ImageCache
from entrep.data.release import DataError, file_sha1, load_release
from entrep.embedding import eval_loader
from entrep.engine import FoldTrainer, make_accelerator
from entrep.errors import EntrepError
from entrep.io import (atomic_dir, atomic_write_csv, atomic_write_json, exclusive, exclusive_run, fingerprint,
                       read_json)
from entrep.labels import LabelSet
from entrep.memory import MEMORY_FILE, Memory, save_memory
from entrep.model.backbone import base_weights_file, image_stats, input_size
from entrep.model.checkpoint import (
    FOLD_FILES,
    METRICS_FILE,
    check_compatible,
    fold_dir,
    fold_finished,
    load_fold_weights,
    mark_finished,
    verify_fold,
    write_weights,
)
from entrep.model.entrep_clip import build_model
from entrep.oof import OOF_FILE, FoldOOF, save_fold_oof
from entrep.figures import write_report
from entrep.settings import Settings, fold_settings
from entrep.timing import StageTimer
from entrep.wise import embed_fold_outputs, load_run_oof

log = logging.getLogger("entrep.train")


# what a launcher (torchrun, accelerate launch) sets to make its processes one group
LAUNCH_GROUP_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                    "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def fold_share(cfg) -> tuple[tuple[int, int] | None, str]:
    """((this process's rank, the launch's processes), what was picked) when the launch trains whole folds
    per process (train.parallel=folds, or auto with no more processes than folds to train); (None, ...)
    for DDP or one process. Before any Accelerator exists, the process leaves the launch's group (its
    environment no longer names it, so Accelerate sees one process and wraps nothing in DDP), keeps its
    own GPU, and on CPU its share of the cores. Called before logging is set up: the caller logs the line."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or cfg.train.parallel == "ddp":
        return None, ""
    todo = len(cfg.train.folds or range(cfg.cv.n_splits))
    if cfg.train.parallel == "auto" and world > todo:
        return None, f"train.parallel=auto: DDP over {world} processes (more processes than the {todo} folds to train)"
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    for key in LAUNCH_GROUP_ENV:
        os.environ.pop(key, None)
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return (rank, world), f"train.parallel={cfg.train.parallel}: process {rank} of {world} trains whole folds alone"


def run_accelerator(cfg):
    """The Accelerator of a training run: accumulation, DDP that tolerates parameters a batch leaves
    unused (an all-unlabelled batch skips the heads), and `train.log_with`'s trackers under RUN/logs."""
    return make_accelerator(cfg, gradient_accumulation_steps=cfg.train.grad_accum,
                            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
                            log_with=cfg.train.log_with or None, project_dir=str(cfg.run_dir / "logs"))


def start_trackers(accelerator, cfg) -> None:
    """Accelerate's trackers (`train.log_with`): the run's config as hyperparameters; the trainer logs
    per-epoch losses and held-out scores, the report the OOF figures. A tracker whose package is
    missing is an error rather than Accelerate's silent drop."""
    if not cfg.train.log_with:
        return
    hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat_dict(to_dict(cfg)).items()}
    accelerator.init_trackers(cfg.name, config=hparams)
    if accelerator.is_main_process:
        have = {type(t).__name__.lower() for t in accelerator.trackers}
        if missing := [t for t in cfg.train.log_with if t != "all" and not any(t.replace("_", "") in h for h in have)]:
            raise EntrepError(f"train.log_with {missing}: the package is not installed (pip install {' '.join(missing)})")


def check_launch(accelerator) -> None:
    """Refuse a launch whose processes do not form one job: `accelerate launch --multi_gpu` on a machine
    where Accelerate finds no GPU starts N processes that each see a world of 1, and each would train
    every fold and write the same files."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise EntrepError(
            f"the launcher started {launched} processes but Accelerate sees {accelerator.num_processes} "
            f"({accelerator.distributed_type}): each would train every fold and overwrite the others' files. On GPUs, "
            f"check that every process sees a GPU (nvidia-smi, CUDA_VISIBLE_DEVICES); for several processes on "
            f"CPU, launch with ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {launched} ...")
    log.info("accelerate: %d process(es), %s, device %s, mixed precision %s", accelerator.num_processes,
             accelerator.distributed_type, accelerator.device, accelerator.mixed_precision)
    for warning in launcher_mismatches(accelerator):
        log.warning(warning)


def launcher_mismatches(accelerator) -> list[str]:
    """What the launcher was asked for and does not happen: `--mixed_precision` (train.mixed_precision
    decides), and `--num_processes N` without `--multi_gpu` (one process runs)."""
    out = []
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if asked and asked != accelerator.mixed_precision:
        out.append(f"accelerate launch --mixed_precision {asked} is not used: train.mixed_precision decides, and it "
                   f"resolves to {accelerator.mixed_precision} here (set train.mixed_precision={asked} to use it)")
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:  # not Linux, or no /proc: nothing to compare
        parent = []
    args = [a.decode(errors="replace") for a in parent]
    if "launch" in args and "--num_processes" in args and accelerator.num_processes == 1:
        n = args[args.index("--num_processes") + 1] if args.index("--num_processes") + 1 < len(args) else "?"
        if n not in ("1", "?") and not {"--multi_gpu", "--num_machines"} & set(args):
            out.append(f"accelerate launch --num_processes {n} started one process: add --multi_gpu (on CPU: "
                       f"ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {n} ...)")
    return out


def on_main_first(accelerator, fn, others=None):
    """fn() on the main process, then `others` (default fn) on the rest. A kit error on the main process
    stops every process with its line at once, where the others would otherwise wait at a barrier."""
    error, result = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except EntrepError as e:
            error = str(e)
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error is not None:
        raise EntrepError(error)
    if not accelerator.is_main_process:
        result = (others or fn)()
    return result


def agree_across_processes(accelerator, cfg) -> None:
    """Every process of a launch must train the same run: processes started with other arguments (a
    second machine given another command line) would hang at the first collective after an epoch, so
    they stop at start-up, each naming the keys that differ."""
    if accelerator.num_processes == 1:
        return
    mine = {k: v for k, v in flat_dict(to_dict(cfg)).items() if not in_keys(k, PER_MACHINE_KEYS)}
    every = gather_object([json.dumps(mine, sort_keys=True, default=str)])
    if len(set(every)) == 1:
        return
    views = [json.loads(x) for x in every]
    keys = sorted({k for v in views[1:] for k in v.keys() | views[0].keys() if v.get(k) != views[0].get(k)})
    raise EntrepError(f"the {accelerator.num_processes} processes of this launch were given different settings: "
                      + "; ".join(f"{k} = " + ", ".join(f"{v.get(k)!r} (process {i})" for i, v in enumerate(views))
                                  for k in keys[:3])
                      + "; start every process (every machine) with the same train.py command")


def effective_batch(cfg, accelerator) -> dict:
    return {"per_process": cfg.train.batch_size, "processes": accelerator.num_processes,
            "grad_accum": cfg.train.grad_accum,
            "effective": cfg.train.batch_size * accelerator.num_processes * cfg.train.grad_accum}


def claim_run(cfg, table: pd.DataFrame | None = None, accelerator=None) -> None:
    """The run's identity, written once: its defining config (config.yaml) and, in run.json, the data it
    trains on (per image: pixels, label, captions, links) and its effective batch. A later train.py on
    the run must match all three (only the keys that steer one invocation may differ), else it is refused
    in one line and nothing is written: a run is tied to its data's content, not to file names."""
    path = cfg.run_dir / rundir.CONFIG
    if path.is_file():
        diff = run_defining_diff(load_config(path), cfg)
        if diff:
            raise EntrepError(f"{cfg.run_dir} was trained with other values of {', '.join(diff)} (see its "
                              f"config.yaml); use another --name for new settings, or drop --config to continue with "
                              f"the run's own")
    identity = cfg.run_dir / rundir.IDENTITY
    now = {"data": data_identity(table) if table is not None else {},
           "batch": effective_batch(cfg, accelerator) if accelerator is not None else {}}
    if identity.is_file():
        before = read_json(identity)
        if change := describe_data_change(before.get("data", {}), now["data"]):
            raise EntrepError(f"{cfg.run_dir} was trained on other data than {cfg.data.root} holds now ({change}); its "
                              f"finished folds and this data cannot make one report: train a new --name on this data")
        b, n = before.get("batch", {}), now["batch"]
        if b and n and b["effective"] != n["effective"]:
            need = b["effective"] // (n["per_process"] * n["processes"])
            fix = (f"keep the effective batch with train.grad_accum={need}" if need >= 1 and
                   need * n["per_process"] * n["processes"] == b["effective"] else f"launch {b['processes']} processes")
            raise EntrepError(f"{cfg.run_dir}: its folds trained at an effective batch of {b['effective']} "
                              f"({b['per_process']} per process x {b['processes']} processes x {b['grad_accum']} "
                              f"accumulation); this launch gives {n['effective']} ({n['per_process']} x "
                              f"{n['processes']} x {n['grad_accum']}); {fix}, or train a new --name")
    if not path.is_file():
        save_config(cfg, path)
    if not identity.is_file() and table is not None:
        atomic_write_json(identity, now)


def read_training_release(cfg, labels: LabelSet) -> pd.DataFrame:
    """The release table, with unreadable images skipped or refused (data.bad_images) and what was fixed logged."""
    table, report = load_release(cfg.data.root, labels.names, cfg.data.check_images)
    if report.bad_images:
        listing = "; ".join(f"{p} ({e})" for p, e in report.bad_images[:5])
        if cfg.data.bad_images == "error":
            raise DataError(f"{len(report.bad_images)} unreadable images: {listing}. "
                            f"Fix or remove them, or set data.bad_images=skip")
        log.warning("skipped %d unreadable images: %s", len(report.bad_images), listing)
    for what, items in (("unknown labels (ignored)", report.unknown_labels), ("annotations naming missing files",
                        report.missing), ("case-fixed file names", report.case_fixes)):
        if items:
            log.info("%d %s, e.g. %s", len(items), what, items[0])
    if report.label_conflicts:
        listing = "; ".join(f"{img}: {a} vs {b}" for img, a, b in report.label_conflicts[:5])
        if cfg.data.label_conflicts == "error":
            raise DataError(f"{len(report.label_conflicts)} pictures are filed with two labels ({listing}); correct "
                            f"the annotation, or set data.label_conflicts=unlabel to train them unlabelled")
        conflicted = {img for img, _, _ in report.label_conflicts}
        table.loc[table["image"].isin(conflicted), ["label", "y"]] = [None, -1]
        log.warning("%d pictures filed with two labels train unlabelled (data.label_conflicts=unlabel): %s",
                    len(conflicted), listing)
    if (table["y"] < 0).all():
        raise DataError(f"{cfg.data.root}: no labelled images; training needs class labels")
    return table


@dataclass
class RunData:
    """What every fold of a run reads: the release table, its decoded pixels (row order) and its folds."""
    labels: LabelSet
    table: pd.DataFrame
    pixels: CachedPixels
    folds: pd.DataFrame  # image, label, group (i2i component), fold_group, fold, sha1; table's row order

    @property
    def fold_of(self) -> np.ndarray:
        return self.folds["fold"].to_numpy()

    @property
    def groups(self) -> np.ndarray:
        return self.folds["group"].to_numpy()

    @functools.cached_property
    def signatures(self):
        """The release's near-duplicate signatures, made on first use and kept for every fold of the call."""
        return file_signatures(self.table["path"].tolist())


def load_run_data(cfg, accelerator, timer: StageTimer | None = None) -> RunData:
    """The release, decoded once into the shared image cache, and the run's frozen folds (made and
    saved on the first call, under the run-level hold; the main process first, the others then read
    what it wrote)."""
    timer = timer or StageTimer()
    labels = LabelSet.from_config(cfg.labels)
    with timer.stage("release"):
        table = read_training_release(cfg, labels)
    with timer.stage("model_config"):  # the model's input size; the first touch imports open_clip
        side = input_size(cfg.model.name, cfg.model.pretrained, cfg.model.image_size)
    cache = ImageCache(cfg.image_cache_dir, cfg.data.working_side(side))

    def pixels_and_folds():
        with timer.stage("image_cache"):
            pixels = cache.pixels(table["path"].tolist(), table["sha1"].tolist())
        # folds.csv, then config.yaml and run.json, made once and under one hold: no other call's claim between
        with timer.stage("folds"), run_files(cfg, accelerator):
            sigs = (lambda: file_signatures(table["path"].tolist())) if cfg.cv.near_dup else None
            folds = load_or_make_folds(cfg.run_dir / rundir.FOLDS, table, cfg.cv.n_splits, cfg.cv.seed, sigs,
                                       cfg.cv.near_dup_threshold, cfg.cv.folds_from, cfg.image_cache_dir)
            if accelerator.is_main_process:
                claim_run(cfg, table, accelerator)
            return pixels, folds

    # the main process decodes and folds first; the others then read what it wrote (cache, folds.csv)
    pixels, folds = on_main_first(accelerator, pixels_and_folds)
    log.info("%d images (%d labelled) from %s; %d %s (i2i links, patients, near-duplicates%s)",
             len(table), int((table["y"] >= 0).sum()), cfg.data.root, cfg.cv.n_splits,
             describe_shape(grouping_shape(folds)), "" if cfg.cv.near_dup else ": off, cv.near_dup=false")
    for label, lacking in missing_classes(folds, cfg.cv.n_splits).items():
        log.warning("class %s has fewer groups of alike images than folds: folds %s hold none of it, so their "
                    "models are scored without it (see data check)", label, lacking)
    return RunData(labels, table, pixels, folds)


@dataclass
class FoldResult:
    """One trained fold: where it is, its final figures and per-epoch rows, and its OOF outputs (None
    for the all-data model, which holds nothing out; or on processes other than the main one)."""
    fold: int
    dir: Path
    metrics: dict
    history: list[dict]
    oof: FoldOOF | None


def fold_outputs(cfg, model, accelerator, data: RunData, k: int, val_loader, stats) -> tuple[FoldOOF | None, Memory | None]:
    """Fold k's held-out images and captions embedded with flip TTA, at every WiSE scale of infer.wise_grid
    (1.0 always: the model as trained), and the known-pair memory (every image of the release, written
    into the fold folder with the rest) when infer.memory_weight is on; the OOF outputs are None for
    the all-data model (k = -1)."""
    return embed_fold_outputs(cfg, model, accelerator, data.labels, data.table, data.pixels, data.fold_of, k,
                              val_loader, stats, None)


def train_fold(cfg, accelerator, data: RunData, k: int, console=None, timer: StageTimer | None = None) -> FoldResult:
    """Fit fold k (k = -1: one model on all data), embed its held-out images and captions with flip TTA,
    and save adapter + kit weights, history, OOF file and metrics.json (last: it marks the fold finished).
    `timer` gets the fold's stages (build, pseudo-labels, train setup, train steps, monitoring, OOF, save)."""
    timer = timer or StageTimer()
    labels, table = data.labels, data.table
    out_dir = fold_dir(cfg.run_dir, k)
    t0 = time.time()
    with timer.stage("pseudo_labels"):
        pseudo = pseudo_labels(cfg, accelerator, data, k) if cfg.train.pseudo_from else None
    with timer.stage("build"):
        set_seed(cfg.train.seed + max(k, 0), deterministic=False)
        model = build_model(cfg, labels)
        stats = image_stats(model.base)
    train_rows = np.flatnonzero(data.fold_of != k) if k >= 0 else np.arange(len(table))
    val_rows = np.flatnonzero(data.fold_of == k) if k >= 0 else np.array([], dtype=int)
    fit_timer = StageTimer()
    with timer.stage("train_setup"):  # the whole fit, less its steps and monitoring (subtracted below)
        val = eval_loader(data.pixels[val_rows], accelerator, cfg.train.eval_batch_size) if len(val_rows) else None
        last, history = FoldTrainer(cfg, accelerator, labels, console).fit(
            model, data.pixels, table, train_rows, val_rows, data.groups, stats, val_loader=val,
            tag="all data" if k == -1 else f"fold {k}", extra=pseudo and (pseudo.pixels, pseudo.y), timer=fit_timer)
    timer.add("train_setup", -fit_timer.total)
    for name, seconds in fit_timer.seconds.items():
        timer.add(name, seconds)
    unwrapped = accelerator.unwrap_model(model)
    with timer.stage("oof_embedding"):
        oof, memory = fold_outputs(cfg, model, accelerator, data, k, val, stats)
    metrics = {**last, "epochs": history, "seconds": time.time() - t0,
               "trainable_params": int(sum(p.numel() for p in unwrapped.parameters() if p.requires_grad))}
    if pseudo is not None:
        metrics["pseudo_labels"] = pseudo.summary
        metrics["pseudo_left_out"] = sorted(pseudo.left_out)
    with timer.stage("save"):
        if accelerator.is_main_process:
            base = base_weights_file(cfg.model.pretrained)
            meta = {"fold": k, "model_name": cfg.model.name, "pretrained": cfg.model.pretrained,
                    **({"base_fingerprint": fingerprint(base)} if base is not None else {}),
                    "labels": list(labels.names), "n_train": int(len(train_rows)), "n_val": int(len(val_rows)),
                    "written_by": {"process_index": accelerator.process_index,
                                   "num_processes": accelerator.num_processes,
                                   "distributed_type": accelerator.distributed_type.value}}
            write_fold(out_dir, unwrapped, meta, history, oof, metrics | {"timing": timer.as_dict()}, memory)
            log.info("fold %s: saved to %s by process %d of %d", k, out_dir, accelerator.process_index,
                     accelerator.num_processes)
    log.info("fold %s done in %.0fs: %s", k, time.time() - t0, last)
    with timer.stage("teardown"):
        del model, unwrapped
        accelerator.free_memory()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return FoldResult(k, out_dir, metrics, history, oof if accelerator.is_main_process else None)


def write_fold(out_dir: Path, model, meta: dict, history: list[dict], oof: FoldOOF | None, metrics: dict,
               memory: Memory | None = None) -> None:
    """A trained fold's folder as one unit (weights, history, OOF file, memory, metrics.json last): a failed
    write leaves the earlier folder whole, so a retrained fold can never be its new weights beside
    the old metrics.json that marks it finished."""
    with atomic_dir(out_dir, FOLD_FILES) as tmp:
        write_weights(model, tmp, meta)
        atomic_write_csv(tmp / rundir.HISTORY, pd.DataFrame(history))
        if oof is not None:
            save_fold_oof(tmp / OOF_FILE, oof)
        if memory is not None:
            save_memory(tmp / MEMORY_FILE, memory)
        mark_finished(tmp, metrics)


@dataclass
class PseudoLabels:
    """Test images a fold adds to its training data, with the label another run's same fold gave them."""
    images: list[str]
    pixels: np.ndarray
    y: np.ndarray
    summary: dict  # class -> images added
    left_out: dict  # test image -> the training image it copies (never pseudo-labelled)


def training_copies(cfg, test, table, signatures=None) -> dict[str, str]:
    """Test image -> why it is no pseudo-label: the same file as a training image (by content), or a
    near-duplicate of one (cv.near_dup's pass, test against training; `signatures`: the release's,
    when already made). Such an image would hand a fold a copy of a training image, held-out images
    included, under a label a model gave it."""
    by_sha = dict(zip(table["sha1"], table["image"]))
    names = sorted(test.images)
    out = {n: f"the same file as {by_sha[h]}" for n in names if (h := file_sha1(test.images[n])) in by_sha}
    rest = [n for n in names if n not in out]
    if cfg.cv.near_dup and rest:
        test_sig = file_signatures([str(test.images[n]) for n in rest], desc="test image signatures")
        train_sig = signatures if signatures is not None else file_signatures(table["path"].tolist())
        for i, j, score in near_duplicate_pairs(test_sig, train_sig, threshold=cfg.cv.near_dup_threshold):
            out.setdefault(rest[i], f"a near-duplicate of {table['image'].iloc[j]} ({score:.3f})")
    return out


def source_fold_settings(source: Path, k: int, tta_flip: bool) -> Settings:
    """The inference settings that scored the source run's fold k (report.json folds[k].settings, tuned
    on its other folds): tuned.json is tuned on every fold, fold k's truth included, and would carry it
    into the labels fold k trains on."""
    if not (source / rundir.REPORT).is_file():
        raise EntrepError(f"train.pseudo_from={source}: no {rundir.REPORT}; the settings that label fold {k} are the "
                          f"ones that scored its fold {k} there: let every fold of that run finish first")
    settings = fold_settings(source, k, tta_flip)
    if settings is None:
        raise EntrepError(f"train.pseudo_from={source}: {rundir.REPORT} has no settings for fold {k}; re-score it "
                          f"(python train.py --name {source.name} output_dir={source.parent} train.resume=true)")
    return settings


def pseudo_run(cfg) -> Path:
    """train.pseudo_from, refused in one line unless it is a run directory with its folds."""
    source = Path(cfg.train.pseudo_from)
    if not (source / rundir.CONFIG).is_file() or not (source / rundir.FOLDS).is_file():
        raise EntrepError(f"train.pseudo_from={source}: not a run directory (config.yaml, folds.csv)")
    return source


def check_pseudo_inputs(cfg) -> None:
    """train.pseudo_from and train.pseudo_data, as far as they can be checked before the run's data is read:
    the source is a run directory and the test folder reads as one."""
    if not cfg.train.pseudo_from:
        return
    from entrep.data.release import load_test

    pseudo_run(cfg)
    try:
        load_test(cfg.train.pseudo_data)
    except EntrepError as e:
        raise EntrepError(f"train.pseudo_data={cfg.train.pseudo_data}: {e}") from None


def pseudo_source(cfg, data: RunData, k: int) -> tuple[Path, Path, Config]:
    """(train.pseudo_from, its fold-k folder, its config), refused in one line where its fold k could
    carry this run's fold-k truth (other folds), is unfinished, or labels in another class order."""
    source = pseudo_run(cfg)
    theirs = read_folds(source / rundir.FOLDS)
    fold_of = dict(zip(theirs["image"], theirs["fold"]))
    differ = [n for n, f in zip(data.folds["image"], data.folds["fold"]) if fold_of.get(n) != f]
    if differ:
        raise EntrepError(f"train.pseudo_from={source} has other folds than this run (e.g. {differ[0]}): its fold-k "
                          f"model may have trained on this run's fold k, whose labels would then reach fold k's "
                          f"training through the test images; train it with cv.folds_from={cfg.run_dir} (or this "
                          f"run with cv.folds_from={source})")
    k_dir = fold_dir(source, k)
    if not fold_finished(k_dir):
        raise EntrepError(f"train.pseudo_from={source}: {k_dir.name} is not finished; train it first")
    source_cfg = load_config(source / rundir.CONFIG)
    if list(source_cfg.labels.names) != list(data.labels.names):
        raise EntrepError(f"train.pseudo_from={source} was trained with the labels {list(source_cfg.labels.names)}, "
                          f"this run has {list(data.labels.names)}: its class indices would label this run's images "
                          f"as other classes; use a run with this run's labels.names, in this order")
    check_compatible(verify_fold(k_dir, source_cfg.model.lora.enabled), source_cfg, k_dir)
    return source, k_dir, source_cfg


def pseudo_labels(cfg, accelerator, data: RunData, k: int) -> PseudoLabels:
    """train.pseudo_from's fold-k model labels train.pseudo_data's images; those at train.pseudo_threshold
    or above join fold k's training data. Fold k's model never saw fold k's images, so its labels carry
    nothing of fold k's truth into fold k's training; an ensemble of the run's folds would (through the
    test images), and fold k's OOF figure would flatter. Hence the run must share this run's folds, the
    head weight and WiSE scale are those that scored fold k (`source_fold_settings`), and test images
    that copy a training image are left out (`training_copies`)."""
    from entrep.data.release import load_test
    from entrep.wise import embed_at, has_lora, start_state

    source, k_dir, source_cfg = pseudo_source(cfg, data, k)
    settings = source_fold_settings(source, k, source_cfg.infer.tta_flip)
    test = load_test(cfg.train.pseudo_data)
    left_out = training_copies(cfg, test, data.table, data.signatures if cfg.cv.near_dup else None)
    if left_out:
        log.warning("fold %s: %d test images copy a training image and are left out of the pseudo-labels: %s", k,
                    len(left_out), "; ".join(f"{n} ({why})" for n, why in sorted(left_out.items())[:5])
                    + (" ..." if len(left_out) > 5 else ""))
    names = sorted(n for n in test.images if n not in left_out)
    model = build_model(source_cfg, data.labels)
    start = None if has_lora(model) else start_state(model)  # as built: WiSE's zero-shot end
    load_fold_weights(model, k_dir, adapter_name=k_dir.name)
    stats = image_stats(model.base)
    pixels = ImageCache(cfg.image_cache_dir, cfg.data.working_side(stats.size)).pixels(
        [str(test.images[n]) for n in names], [file_sha1(test.images[n]) for n in names])
    tta = settings.tta_flip
    e, _ = embed_at(accelerator.prepare(model), accelerator, data.labels, stats,
                    eval_loader(np.asarray(pixels), accelerator, cfg.train.eval_batch_size), [], settings.wise["cls"],
                    start, tta_flip=tta)
    probs = e.probs(settings.head_weight, tta)
    keep = np.flatnonzero(probs.max(1) >= cfg.train.pseudo_threshold)
    y = probs.argmax(1)[keep]
    summary = {c: int((y == i).sum()) for i, c in enumerate(data.labels.names) if (y == i).any()}
    del model
    accelerator.free_memory()
    # train images are decoded at this run's working size; the test images must match it
    work = cfg.data.working_side(input_size(cfg.model.name, cfg.model.pretrained, cfg.model.image_size))
    own = ImageCache(cfg.image_cache_dir, work).pixels([str(test.images[names[i]]) for i in keep],
                                                       [file_sha1(test.images[names[i]]) for i in keep])
    log.info("fold %s: %d pseudo-labelled test images from %s/%s (probability >= %s, head weight %s, TTA %s): %s", k,
             len(keep), source, k_dir.name, cfg.train.pseudo_threshold, settings.head_weight, tta, summary)
    return PseudoLabels([names[i] for i in keep], np.asarray(own), y.astype(np.int64), summary, left_out)


def finish_run(cfg, data: RunData) -> dict | None:
    """The OOF report (report.json, tuned.json, oof.csv, plots) once every fold has finished; None before."""
    done = {k: fold_dir(cfg.run_dir, k) for k in range(cfg.cv.n_splits) if fold_finished(fold_dir(cfg.run_dir, k))}
    if len(done) < cfg.cv.n_splits:
        return None
    oof = load_run_oof(cfg, data, done)  # completes the files where infer.wise_grid / infer.memory_weight ask more
    pseudo = {str(k): m["pseudo_labels"] for k, d in done.items()
              if "pseudo_labels" in (m := read_json(d / METRICS_FILE))}
    extra = {"grouping": grouping_shape(data.folds)}
    if pseudo:
        extra["pseudo_labels"] = {"from": cfg.train.pseudo_from, "threshold": cfg.train.pseudo_threshold,
                                  "added_per_fold_and_class": pseudo}
    return write_report(cfg.run_dir, oof, data.table, list(data.labels.names), cfg, extra)


def train_run(cfg, accelerator, console=None, started: float | None = None,
              share: tuple[int, int] | None = None) -> tuple[list[FoldResult], dict | None]:
    """`train.folds` of the run (every fold when empty), skipping finished ones under train.resume,
    then the report when every fold is done: (trained folds, report or None). `share` (rank, processes;
    `fold_share`): this process trains every processes-th fold from its rank. Where the time went goes
    to RUN/timing.json (`started`: when the process started, for the start-up stage)."""
    timer, t0, began = StageTimer(), time.perf_counter(), time.time()
    if started is not None:
        timer.add("start_up", max(0.0, time.time() - started))
    with timer.stage("identity"):
        agree_across_processes(accelerator, cfg)
    check_pseudo_inputs(cfg)  # before config.yaml is claimed: a typo there must not pin a run that never trained
    data = load_run_data(cfg, accelerator, timer)  # decodes beside another call; folds and claim under run_files
    switches = recipe_switches(cfg)
    log.info("recipe: %s", "; ".join(f"{k} {v}" for k, v in switches.items() if v != "off"))
    log.info("recipe, off: %s", ", ".join(k for k, v in switches.items() if v == "off") or "nothing")
    results, folds = [], {}
    todo = cfg.train.folds or list(range(cfg.cv.n_splits))
    if share is not None:
        todo = todo[share[0]::share[1]]
        log.info("process %d of %d: folds %s", share[0], share[1], todo)
    for k in todo:
        raise_if_interrupted()
        with fold_held(cfg, accelerator, k):  # each fold by one call: disjoint folds of a run train at once
            if cfg.train.resume and fold_finished(fold_dir(cfg.run_dir, k)):
                log.info("fold %s: finished earlier, skipped (train.resume=true)", k)
                continue
            folds[k] = StageTimer()
            results.append(train_fold(cfg, accelerator, data, k, console, folds[k]))
    accelerator.wait_for_everyone()
    raise_if_interrupted()
    if not accelerator.is_main_process:
        return results, None
    with run_files(cfg, accelerator):  # whichever call finishes the last fold writes the report
        with timer.stage("report"):
            report = None if written_since(cfg, began) else finish_run(cfg, data)
        done = sum(fold_finished(fold_dir(cfg.run_dir, k)) for k in range(cfg.cv.n_splits))
        if report is None and cfg.train.folds != [-1] and done < cfg.cv.n_splits:  # an all-data model has no report
            log.info("OOF report waits for every fold: %d of %d finished; the call that finishes the last writes it",
                     done, cfg.cv.n_splits)
        write_timing(cfg.run_dir, timer, folds, time.perf_counter() - t0 + timer.seconds.get("start_up", 0.0))
    return results, report


RUN_FILES_WAIT = 3600  # s a call waits for another call's start-up (decode, folds) or report on the same run


def written_since(cfg, began: float) -> bool:
    """The report was written during this call, after every fold finished, by another call on the run (two
    processes that finish their last folds together): this one leaves it as it is."""
    report = cfg.run_dir / rundir.REPORT
    done = [fold_dir(cfg.run_dir, k) / METRICS_FILE for k in range(cfg.cv.n_splits)]
    if not report.is_file() or not all(d.is_file() for d in done):
        return False
    at = report.stat().st_mtime
    if at >= began and at >= max(d.stat().st_mtime for d in done):
        log.info("the OOF report was written by another call on this run, after its last fold: %s", report)
        return True
    return False


@contextlib.contextmanager
def run_files(cfg, accelerator):
    """The run-level files (config.yaml, run.json, folds.csv, report, timing.json) for this call alone,
    on the main process: another train.py on the run waits for its turn (a first call's decoding and
    folds, a last call's report), then goes on with its own folds."""
    if not accelerator.is_main_process:
        yield
        return
    # under DDP the other ranks wait in a collective, which times out long before an hour: refuse at once
    with exclusive_run(cfg.run_dir, "train.py", wait=RUN_FILES_WAIT if accelerator.num_processes == 1 else 0):
        yield


@contextlib.contextmanager
def fold_held(cfg, accelerator, k: int):
    """Fold k of the run for this call alone: another train.py training it is refused in one line, on
    every process of the launch."""
    with contextlib.ExitStack() as stack:
        on_main_first(accelerator, lambda: stack.enter_context(exclusive(
            cfg.run_dir / f".lock.fold{k}", "train.py", f"fold {k} of {cfg.run_dir} is being trained by",
            "train other folds (train.folds=[...]) or wait for it")), others=lambda: None)
        yield


def write_timing(run_dir: Path, timer: StageTimer, folds: dict[int, StageTimer], total_s: float) -> dict:
    """timing.json: this call's wall time per stage, per fold and in all; earlier calls of the run kept."""
    stages = dict(timer.as_dict())
    for t in folds.values():
        for name, seconds in t.seconds.items():
            stages[name] = round(stages.get(name, 0.0) + seconds, 3)
    call = {"total_s": round(total_s, 3), "stages": stages, "folds": {str(k): t.as_dict() for k, t in folds.items()},
            "outside_train_steps": round(1 - stages.get("train_steps", 0.0) / max(total_s, 1e-9), 4)}
    path = run_dir / rundir.TIMING
    earlier = read_json(path) if path.is_file() else {}
    atomic_write_json(path, call | {"earlier_calls": earlier.get("earlier_calls", []) +
                                    ([{k: v for k, v in earlier.items() if k != "earlier_calls"}] if earlier else [])})
    return call
