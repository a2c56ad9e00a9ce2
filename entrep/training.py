"""A run's training lifecycle: the run's data (release, decoded images, folds), its identity, one
fold (build -> fit -> OOF embedding -> save, metrics.json last) and the report once every fold is done.

    data = load_run_data(cfg, accelerator)        # the release, its pixels and its frozen folds
    claim_run(cfg)                                # the run's defining config, written once
    result = train_fold(cfg, accelerator, data, k)
    report = finish_run(cfg, data)                # None until every fold has finished

`commands/train.py` (train.py) runs this for `train.folds`; `entrep.train_fold(run, k)` for a notebook.
"""
from __future__ import annotations

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
from entrep.config import flat_dict, load_config, run_defining_diff, save_config, to_dict
from entrep.data.folds import file_signatures, load_or_make_folds, missing_classes
from entrep.data.identity import data_identity, describe_data_change
from entrep.data.images import CachedPixels, ImageCache
from entrep.data.release import DataError, load_release
from entrep.embedding import eval_loader
from entrep.engine import FoldTrainer, make_accelerator
from entrep.errors import EntrepError
from entrep.io import atomic_write_csv, atomic_write_json, read_json
from entrep.labels import LabelSet
from entrep.model.backbone import image_stats, input_size
from entrep.model.checkpoint import fold_dir, fold_finished, mark_finished, save_weights
from entrep.model.entrep_clip import build_model
from entrep.oof import OOF_FILE, FoldOOF, save_fold_oof
from entrep.report import write_report
from entrep.wise import embed_fold_outputs, load_run_oof

log = logging.getLogger("entrep.train")


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


# keys that may differ between the processes of one launch: where each machine keeps its files
PER_MACHINE_KEYS = ("output_dir", "data.root", "data.cache_dir", "data.num_workers")


def agree_across_processes(accelerator, cfg) -> None:
    """Every process of a launch must train the same run: processes started with other arguments (a
    second machine given another command line) would hang at the first collective after an epoch, so
    they stop at start-up, each naming the keys that differ."""
    if accelerator.num_processes == 1:
        return
    mine = {k: v for k, v in flat_dict(to_dict(cfg)).items() if k not in PER_MACHINE_KEYS}
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


def load_run_data(cfg, accelerator) -> RunData:
    """The release, decoded once into the shared image cache, and the run's frozen folds (made and
    saved on the first call; the main process first, the others then read what it wrote)."""
    labels = LabelSet.from_config(cfg.labels)
    table = read_training_release(cfg, labels)
    cache = ImageCache(cfg.image_cache_dir, cfg.data.working_side(input_size(cfg.model.name, cfg.model.pretrained,
                                                                             cfg.model.image_size)))

    def pixels_and_folds():
        pixels = cache.pixels(table["path"].tolist(), table["sha1"].tolist())
        sigs = (lambda: file_signatures(table["path"].tolist())) if cfg.cv.near_dup else None
        return pixels, load_or_make_folds(cfg.run_dir / rundir.FOLDS, table, cfg.cv.n_splits, cfg.cv.seed, sigs,
                                          cfg.cv.near_dup_threshold, cfg.cv.folds_from)

    # the main process decodes and folds first; the others then read what it wrote (cache, folds.csv)
    pixels, folds = on_main_first(accelerator, pixels_and_folds)
    log.info("%d images (%d labelled) from %s; %d folds over %d groups of alike images (i2i links, patients, "
             "near-duplicates)", len(table), int((table["y"] >= 0).sum()), cfg.data.root, cfg.cv.n_splits,
             folds["fold_group"].nunique())
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


def fold_outputs(cfg, model, accelerator, data: RunData, k: int, val_loader, stats, out_dir: Path) -> FoldOOF | None:
    """Fold k's held-out images and captions embedded with flip TTA, at every WiSE scale of infer.wise_grid
    (1.0 always: the model as trained), and the known-pair memory (every image of the release, written to
    out_dir/memory.npz) when infer.memory_weight is on; None for the all-data model (k = -1)."""
    return embed_fold_outputs(cfg, model, accelerator, data.labels, data.table, data.pixels, data.fold_of, k,
                              val_loader, stats, out_dir)


def train_fold(cfg, accelerator, data: RunData, k: int, console=None) -> FoldResult:
    """Fit fold k (k = -1: one model on all data), embed its held-out images and captions with flip TTA,
    and save adapter + kit weights, history, OOF file and metrics.json (last: it marks the fold finished)."""
    labels, table = data.labels, data.table
    out_dir = fold_dir(cfg.run_dir, k)
    set_seed(cfg.train.seed + max(k, 0), deterministic=False)
    model = build_model(cfg, labels)
    stats = image_stats(model.base)
    t0 = time.time()
    train_rows = np.flatnonzero(data.fold_of != k) if k >= 0 else np.arange(len(table))
    val_rows = np.flatnonzero(data.fold_of == k) if k >= 0 else np.array([], dtype=int)
    val = eval_loader(data.pixels[val_rows], accelerator, cfg.train.eval_batch_size) if len(val_rows) else None
    last, history = FoldTrainer(cfg, accelerator, labels, console).fit(
        model, data.pixels, table, train_rows, val_rows, data.groups, stats, val_loader=val,
        tag="all data" if k == -1 else f"fold {k}")
    unwrapped = accelerator.unwrap_model(model)
    oof = fold_outputs(cfg, model, accelerator, data, k, val, stats, out_dir)
    metrics = {**last, "epochs": history, "seconds": time.time() - t0,
               "trainable_params": int(sum(p.numel() for p in unwrapped.parameters() if p.requires_grad))}
    if accelerator.is_main_process:
        meta = {"fold": k, "model_name": cfg.model.name, "pretrained": cfg.model.pretrained,
                "labels": list(labels.names), "n_train": int(len(train_rows)), "n_val": int(len(val_rows)),
                "written_by": {"process_index": accelerator.process_index, "num_processes": accelerator.num_processes,
                               "distributed_type": accelerator.distributed_type.value}}
        save_weights(unwrapped, out_dir, meta)
        log.info("fold %s: saved to %s by process %d of %d", k, out_dir, accelerator.process_index,
                 accelerator.num_processes)
        atomic_write_csv(out_dir / "history.csv", pd.DataFrame(history))
        if oof is not None:
            save_fold_oof(out_dir / OOF_FILE, oof)
        mark_finished(out_dir, metrics)
    log.info("fold %s done in %.0fs: %s", k, time.time() - t0, last)
    del model, unwrapped
    accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return FoldResult(k, out_dir, metrics, history, oof if accelerator.is_main_process else None)


def finish_run(cfg, data: RunData) -> dict | None:
    """The OOF report (report.json, tuned.json, oof.csv, plots) once every fold has finished; None before."""
    done = {k: fold_dir(cfg.run_dir, k) for k in range(cfg.cv.n_splits) if fold_finished(fold_dir(cfg.run_dir, k))}
    if len(done) < cfg.cv.n_splits:
        return None
    oof = load_run_oof(cfg, data, done)  # completes the files where infer.wise_grid / infer.memory_weight ask more
    return write_report(cfg.run_dir, oof, data.table, list(data.labels.names), cfg)


def train_run(cfg, accelerator, console=None) -> tuple[list[FoldResult], dict | None]:
    """`train.folds` of the run (every fold when empty), skipping finished ones under train.resume,
    then the report when every fold is done: (trained folds, report or None)."""
    agree_across_processes(accelerator, cfg)
    data = load_run_data(cfg, accelerator)
    on_main_first(accelerator, lambda: claim_run(cfg, data.table, accelerator), others=lambda: None)
    results = []
    for k in cfg.train.folds or list(range(cfg.cv.n_splits)):
        if cfg.train.resume and fold_finished(fold_dir(cfg.run_dir, k)):
            log.info("fold %s: finished earlier, skipped (train.resume=true)", k)
            continue
        results.append(train_fold(cfg, accelerator, data, k, console))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return results, None
    report = finish_run(cfg, data)
    if report is None and cfg.train.folds != [-1]:  # an all-data model has no held-out images, hence no report
        done = sum(fold_finished(fold_dir(cfg.run_dir, k)) for k in range(cfg.cv.n_splits))
        log.info("OOF report waits for every fold: %d of %d finished", done, cfg.cv.n_splits)
    return results, report
