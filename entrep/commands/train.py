"""k-fold training: every fold (or `train.folds`) in one process, OOF report at the end.

    accelerate launch train.py --config C.yaml [--data DIR] [--name NAME] [key=value ...]
"""
from __future__ import annotations

import gc
import logging
import time

import numpy as np
import pandas as pd

from entrep.cli import console, parser, setup_logging
from entrep.config import load_config
from entrep.io import atomic_write_csv, atomic_write_json

log = logging.getLogger("entrep.train")


def parse(argv):
    """The config: --config + overrides; without --config, an existing run's own config.yaml + overrides
    (so resuming or adding folds needs only --name and the keys that steer this invocation)."""
    from pathlib import Path

    from entrep.config import Config, ConfigError, parse_override

    ap = parser("train.py", "Fit the model with k-fold cross-validation.")
    ap.add_argument("--config", help="YAML config; optional when --name names an existing run")
    ap.add_argument("--data", help="training release folder (overrides data.root)")
    ap.add_argument("--name", help="run name: the run directory is output_dir/NAME")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config, every key with its help, and exit")
    args = ap.parse_intermixed_args(argv)
    extra = ([f"data.root={args.data}"] if args.data else []) + ([f"name={args.name}"] if args.name else [])
    base = args.config
    if base is None:
        given = dict(parse_override(o) for o in args.overrides)
        run = Path(str(given.get("output_dir", Config.output_dir))) / (args.name or Config.name)
        if not (run / "config.yaml").is_file():
            raise ConfigError(f"--config is required for a new run ({run} has no config.yaml)")
        base = run / "config.yaml"
    cfg = load_config(base, list(args.overrides) + extra)
    if args.print_config:
        from entrep.config import describe

        print(describe(cfg))
        raise SystemExit(0)
    return cfg


def claim_run(cfg) -> None:
    """Write the run's defining config once; a later train.py on the run must match it (only the keys
    that steer one invocation may differ), else it is refused and config.yaml is left as it is."""
    from entrep.config import load_config, run_defining_diff, save_config
    from entrep.errors import EntrepError

    path = cfg.run_dir / "config.yaml"
    if not path.is_file():
        save_config(cfg, path)
        return
    diff = run_defining_diff(load_config(path), cfg)
    if diff:
        raise EntrepError(f"{cfg.run_dir} was trained with other values of {', '.join(diff)} (see its config.yaml); "
                          f"use another --name for new settings, or drop --config to continue with the run's own")


def main(argv=None) -> int:
    import contextlib
    import os

    from entrep.io import exclusive_run

    cfg = parse(argv)
    # one writer per run directory; under a launcher only the main process (rank 0) holds it
    main_process = os.environ.get("RANK", "0") == "0"
    with exclusive_run(cfg.run_dir, "train.py") if main_process else contextlib.nullcontext():
        if main_process:
            claim_run(cfg)
        return _train(cfg)


def _train(cfg) -> int:
    from entrep.model.backbone import set_offline

    set_offline(cfg.model.offline)  # before anything imports huggingface_hub
    import torch
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    from entrep.data.folds import file_signatures, load_or_make_folds
    from entrep.data.images import ImageCache
    from entrep.data.release import DataError, load_release
    from entrep.engine import FoldTrainer, embed_images, embed_texts, eval_loader, make_accelerator
    from entrep.labels import LabelSet
    from entrep.model.backbone import image_stats, input_size
    from entrep.model.checkpoint import fold_dir, fold_finished, save_weights
    from entrep.model.entrep_clip import build_model
    from entrep.report import OOF_FILE, load_fold_oof, save_fold_oof, write_report

    acc = make_accelerator(cfg, gradient_accumulation_steps=cfg.train.grad_accum,
                           kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
                           log_with=cfg.train.log_with or None, project_dir=str(cfg.run_dir / "logs"))
    setup_logging(acc.is_main_process)
    check_launch(acc)
    start_trackers(acc, cfg)
    labels = LabelSet.from_config(cfg.labels)
    run_dir = cfg.run_dir

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
    if (table["y"] < 0).all():
        raise DataError(f"{cfg.data.root}: no labelled images; training needs class labels")
    cache = ImageCache(cfg.image_cache_dir, cfg.data.working_side(input_size(cfg.model.name, cfg.model.pretrained)))
    with acc.main_process_first():
        pixels = cache.pixels(table["path"].tolist(), table["sha1"].tolist())
        sigs = (lambda: file_signatures(table["path"].tolist())) if cfg.cv.near_dup else None
        folds = load_or_make_folds(run_dir / "folds.csv", table, cfg.cv.n_splits, cfg.cv.seed, sigs,
                                   cfg.cv.near_dup_threshold, cfg.cv.folds_from)
    fold_of, groups = folds["fold"].to_numpy(), folds["group"].to_numpy()
    log.info("%d images (%d labelled) from %s; %d folds over %d groups of alike images (i2i links, patients, "
             "near-duplicates)", len(table), int((table["y"] >= 0).sum()), cfg.data.root, cfg.cv.n_splits,
             folds["fold_group"].nunique() if "fold_group" in folds else folds["group"].nunique())

    fold_ids = cfg.train.folds or list(range(cfg.cv.n_splits))
    stats = None
    trainer = FoldTrainer(cfg, acc, labels, console)
    for k in fold_ids:
        out_dir = fold_dir(run_dir, k)
        if cfg.train.resume and fold_finished(out_dir):
            log.info("fold %s: finished earlier, skipped (train.resume=true)", k)
            continue
        set_seed(cfg.train.seed + max(k, 0), deterministic=False)
        model = build_model(cfg, labels)
        stats = stats or image_stats(model.base)
        t0 = time.time()
        train_rows = np.flatnonzero(fold_of != k) if k >= 0 else np.arange(len(table))
        val_rows = np.flatnonzero(fold_of == k) if k >= 0 else np.array([], dtype=int)
        val = eval_loader(pixels[val_rows], acc, cfg.train.eval_batch_size) if len(val_rows) else None
        last, history = trainer.fit(model, pixels, table, train_rows, val_rows, groups, stats, val_loader=val,
                                    tag="all data" if k == -1 else f"fold {k}")
        m = acc.unwrap_model(model)
        if len(val_rows):
            e = embed_images(model, val, acc, labels, stats, tta_flip=True)
            captions = sorted({c for caps in table["captions"].iloc[val_rows] for c in caps})
            cap_emb = embed_texts(model, captions, acc)
        if acc.is_main_process:
            meta = {"fold": k, "model_name": cfg.model.name, "pretrained": cfg.model.pretrained,
                    "labels": list(labels.names), "n_train": int(len(train_rows)), "n_val": int(len(val_rows)),
                    "written_by": {"process_index": acc.process_index, "num_processes": acc.num_processes,
                                   "distributed_type": acc.distributed_type.value}}
            save_weights(m, out_dir, meta)
            log.info("fold %s: saved to %s by process %d of %d", k, out_dir, acc.process_index, acc.num_processes)
            atomic_write_csv(out_dir / "history.csv", pd.DataFrame(history))
            if len(val_rows):
                save_fold_oof(out_dir / OOF_FILE, table["image"].iloc[val_rows].tolist(), e, captions, cap_emb)
            # metrics.json last: its presence marks the fold finished (resume relies on it)
            atomic_write_json(out_dir / "metrics.json", {**last, "epochs": history, "seconds": time.time() - t0,
                                                          "trainable_params": int(sum(
                                                              p.numel() for p in m.parameters() if p.requires_grad))})
        log.info("fold %s done in %.0fs: %s", k, time.time() - t0, last)
        del model, m
        acc.free_memory()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    acc.wait_for_everyone()

    if not acc.is_main_process:
        return 0
    done = {k: fold_dir(run_dir, k) for k in range(cfg.cv.n_splits) if fold_finished(fold_dir(run_dir, k))}
    if len(done) < cfg.cv.n_splits:
        if fold_ids != [-1]:  # an all-data model has no held-out images, hence no OOF report
            log.info("OOF report waits for every fold: %d of %d finished", len(done), cfg.cv.n_splits)
        return 0
    oof = {k: load_fold_oof(d / OOF_FILE) for k, d in done.items()}
    rep = write_report(run_dir, oof, table, list(labels.names), cfg)
    figures = {"oof/accuracy": rep["classification"].get("accuracy"), "oof/f1_macro": rep["classification"].get(
        "f1_macro"), "oof/i2i_mrr": rep["i2i"].get("mrr"), "oof/t2i_mrr": rep["t2i"].get("mrr")}
    acc.log({k: v for k, v in figures.items() if v is not None})
    acc.end_training()
    print_report(rep, run_dir)
    return 0


def start_trackers(acc, cfg) -> None:
    """Accelerate's trackers (`train.log_with`): the run's config as hyperparameters; the trainer logs
    per-epoch losses and held-out scores, the report the OOF figures. A tracker whose package is
    missing is an error rather than Accelerate's silent drop."""
    if not cfg.train.log_with:
        return
    from entrep.config import flat_dict, to_dict
    from entrep.errors import EntrepError

    hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat_dict(to_dict(cfg)).items()}
    acc.init_trackers(cfg.name, config=hparams)
    if acc.is_main_process:
        have = {type(t).__name__.lower() for t in acc.trackers}
        if missing := [t for t in cfg.train.log_with if t != "all" and not any(t.replace("_", "") in h for h in have)]:
            raise EntrepError(f"train.log_with {missing}: the package is not installed (pip install {' '.join(missing)})")


def check_launch(acc) -> None:
    """Refuse a launch whose processes do not form one job: `accelerate launch --multi_gpu` on a machine
    where Accelerate finds no GPU starts N processes that each see a world of 1, and each would train
    every fold and write the same files."""
    import os

    from entrep.errors import EntrepError

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise EntrepError(
            f"the launcher started {launched} processes but Accelerate sees {acc.num_processes} "
            f"({acc.distributed_type}): each would train every fold and overwrite the others' files. On GPUs, "
            f"check that every process sees a GPU (nvidia-smi, CUDA_VISIBLE_DEVICES); for several processes on "
            f"CPU, launch with ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {launched} ...")
    log.info("accelerate: %d process(es), %s, device %s, mixed precision %s", acc.num_processes,
             acc.distributed_type, acc.device, acc.mixed_precision)


def print_report(rep: dict, run_dir) -> None:
    from rich.table import Table

    t = Table(title="out-of-fold scores")
    for col in ("task", "metric", "value"):
        t.add_column(col, justify="right" if col == "value" else "left")
    for m in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted"):
        if m in rep["classification"]:
            t.add_row("classification", m, f"{rep['classification'][m]:.4f}")
    for track in ("i2i", "t2i"):
        r = rep[track]
        for m in ("recall@1", "recall@5", "recall@10", "mrr"):
            if m in r:
                t.add_row(track, m, f"{r[m]:.4f}")
        t.add_row(track, "queries", str(r.get("n_queries", 0)))
    from entrep.report import track_settings

    tuned = rep.get("tuned", {})
    per_track = "; ".join(f"{tr}: alpha={track_settings(tuned, tr)[0]} re-ranking {list(track_settings(tuned, tr)[1]) or 'none'}"
                          for tr in ("i2i", "t2i"))
    t.caption = (f"{run_dir}. Figures cross-fitted (each fold scored with settings tuned on the others; report.json "
                 f"'how'). For infer.py, tuned on all folds: head_weight={tuned.get('head_weight')}; {per_track}")
    console.print(t)
