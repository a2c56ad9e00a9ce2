"""Check a config before paying for a GPU hour: weights, data, model, mixed precision, a few real
train steps (speed, peak memory, whether the batch fits) and the full run's wall time.

    python -m entrep.preflight --config C.yaml [--data DIR] [key=value ...]
"""
from __future__ import annotations

import copy
import logging
import math
import os
import resource
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch
from rich.table import Table

from entrep.cli import console, parser, setup_logging
from entrep.config import load_config
from entrep.data.dataset import TrainDataset
from entrep.data.release import load_release
from entrep.embedding import embed_images
from entrep.engine import TrainStep, make_accelerator, resolve_mixed_precision
from entrep.io import atomic_write_json
from entrep.labels import LabelSet
from entrep.model.backbone import check_tokenizer, image_stats, resolve_weights, set_offline
from entrep.model.entrep_clip import build_model

log = logging.getLogger("entrep.preflight")

ENTREP_TRAIN_IMAGES = 1925  # train/ (1,359) + public sample (566): the time estimate without --data
CAPTION = "erythema and swelling of the left vocal fold with a whitish lesion on its free edge"


@dataclass
class Trial:
    """One attempt at a batch setting: fits or not, and what it cost."""
    batch_size: int
    grad_checkpointing: bool
    fits: bool
    img_per_s: float = 0.0
    peak_mib: float = 0.0
    cpu_share: float = 1.0  # CPU time this process got / (wall time x torch threads) while it was timed


def mixed_precision_reason(choice: str) -> tuple[str, str]:
    """(what train.py will use, why): the same rule as engine.resolve_mixed_precision."""
    used = resolve_mixed_precision(choice)
    if choice != "auto":
        return used, f"set by train.mixed_precision={choice}"
    if not torch.cuda.is_available():
        return used, "auto: no GPU"
    major, minor = torch.cuda.get_device_capability()
    return used, (f"auto: compute capability {major}.{minor} " +
                  ("has bf16 (>= 8.0)" if major >= 8 else "lacks bf16 (< 8.0), so fp16 with loss scaling"))


def plan_fit(try_batch, batch_size: int, grad_checkpointing: bool) -> tuple[Trial, list[Trial]]:
    """The configured batch, and where it does not fit, what does: gradient checkpointing at the same
    batch first (same in-batch negatives for the contrastive losses), then the largest halved batch
    (with train.grad_accum making up the effective batch). `try_batch(bs, ckpt) -> Trial`."""
    first = try_batch(batch_size, grad_checkpointing)
    if first.fits:
        return first, []
    tried = []
    if not grad_checkpointing:
        tried.append(try_batch(batch_size, True))
        if tried[-1].fits:
            return first, tried
    bs = batch_size // 2
    while bs >= 1:
        tried.append(try_batch(bs, True))
        if tried[-1].fits:
            break
        bs //= 2
    return first, tried


def advice(first: Trial, tried: list[Trial]) -> str:
    if first.fits:
        return "fits"
    ok = [t for t in tried if t.fits]
    if not ok:
        return "does not fit even at batch 1 with gradient checkpointing: choose a smaller model.name"
    t = ok[0]
    if t.batch_size == first.batch_size:
        return "does not fit; it fits with train.grad_checkpointing=true (same batch, ~30% slower steps)"
    accum = math.ceil(first.batch_size / t.batch_size)
    return (f"does not fit; the largest batch that does is train.batch_size={t.batch_size} with "
            f"train.grad_checkpointing=true; keep the effective batch with train.grad_accum={accum} "
            f"(the contrastive losses then see {t.batch_size} images per step, not {first.batch_size})")


def estimate_seconds(n_images: int, cfg, train_img_s: float, eval_img_s: float, build_s: float,
                     processes: int = 1) -> dict:
    """The full run: folds x (epochs x (train steps + validation embedding) + OOF embedding with TTA)."""
    folds = len(cfg.train.folds) if cfg.train.folds else cfg.cv.n_splits
    all_data = cfg.train.folds == [-1]
    n_val = 0 if all_data else n_images / cfg.cv.n_splits
    n_train = n_images - n_val
    per_step = cfg.train.batch_size * processes
    steps = math.ceil(n_train / per_step) if n_train > per_step else 1
    train_s = steps * per_step / (train_img_s * processes)
    val_s = n_val / (eval_img_s * processes)
    views = 2 if cfg.infer.tta_flip else 1
    fold_s = build_s + cfg.train.epochs * (train_s + val_s) + views * val_s
    return {"folds": folds, "steps_per_epoch": steps, "epoch_s": train_s + val_s, "fold_s": fold_s,
            "total_s": folds * fold_s}


def _rate(x: float) -> str:
    return f"{x:,.1f}" if x >= 10 else f"{x:.3g}"


def _clock(seconds: float) -> str:
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h}h {rem // 60:02d}m" if h else f"{rem // 60}m {rem % 60:02d}s"


def main(argv=None) -> int:
    ap = parser("python -m entrep.preflight", " ".join(__doc__.split("\n\n")[0].split()), config="YAML config")
    ap.add_argument("--data", help="training release folder to read and count (optional)")
    ap.add_argument("--steps", type=int, default=3, help="timed train steps after one warm-up (default 3)")
    ap.add_argument("--images", type=int, default=None,
                    help=f"images assumed by the time estimate without --data (default {ENTREP_TRAIN_IMAGES}, ENTRep)")
    ap.add_argument("--json", help="also write the checks and the measured figures to this file")
    args = ap.parse_intermixed_args(argv)
    if not args.config:
        ap.error("--config is required")
    if args.steps < 1 or (args.images is not None and args.images < 1):
        ap.error(f"--steps {args.steps} --images {args.images}: each is a count of at least 1")
    cfg = load_config(args.config, list(args.overrides) + ([f"data.root={args.data}"] if args.data else []))
    set_offline(cfg.model.offline)
    setup_logging()
    t0 = time.perf_counter()
    rows: list[tuple[str, str]] = [("weights", resolve_weights(cfg.model.name, cfg.model.pretrained, cfg.model.offline)),
                                   ("tokenizer", check_tokenizer(cfg))]
    labels = LabelSet.from_config(cfg.labels)
    n_images = args.images or ENTREP_TRAIN_IMAGES
    if args.data:
        with console.status("reading the release"):
            n_images, summary = _data_summary(cfg, labels)
        rows += summary
    else:
        rows.append(("data", f"not read (no --data); the estimate assumes {n_images:,} images"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cfg.data.num_workers >= cores:
        rows.append(("data.num_workers", f"{cfg.data.num_workers} loader workers on {cores} cores: they and the main "
                                         f"process share the cores and steps slow down; try "
                                         f"data.num_workers={max(0, cores - 1)}"))
    figures = _measure(cfg, labels, args.steps, n_images, rows)
    table = Table(title=f"preflight: {args.config}", show_header=False)
    table.add_column("check", style="bold")
    table.add_column("result", overflow="fold")
    for k, v in rows:
        table.add_row(k, v)
    table.caption = f"preflight took {time.perf_counter() - t0:.0f} s"
    console.print(table)
    if args.json:
        atomic_write_json(args.json, {"checks": dict(rows), **figures})
    return 0


def _measure(cfg, labels, steps: int, n_images: int, rows: list) -> dict:
    """Build the model, time evaluation and the train steps (and smaller batches where the batch does
    not fit), estimate the run; appends the table's rows and returns the figures for --json."""
    tb = time.perf_counter()
    console.print(f"[dim]building {cfg.model.name} ...[/dim]")
    model = build_model(cfg, labels)
    build_s = time.perf_counter() - tb
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stats = image_stats(model.base)
    lora = model.lora_counts
    rows.append(("model", f"{cfg.model.name} at {stats.size} px: {n_train:,} trainable of {n_all:,} parameters "
                          f"({100 * n_train / n_all:.2f}%), built in {build_s:.1f} s"))
    rows.append(("family", f"{model.family.name}; fusion levels {model.levels} of its "
                           f"{model.family.vision.unit} ({model.family.vision.level}); {model.contrastive} image-text "
                           f"loss" if model.has_text else f"{model.family.name}; fusion levels {model.levels}; "
                                                          f"classification and i2i only"))
    rows.append(("LoRA adapters", f"vision {lora['vision']}, text {lora['text']}" if cfg.model.lora.enabled else
                 "off (model.lora.enabled=false)"))
    precision, why = mixed_precision_reason(cfg.train.mixed_precision)
    rows.append(("mixed precision", f"{'fp32' if precision == 'no' else precision} ({why})"))
    accelerator = make_accelerator(cfg)
    rows.append(("device", _device_name(accelerator.device)))
    # the built model serves the eval timing, then leaves the device before the train steps measure their peak
    eval_img_s = _eval_rate(cfg, labels, accelerator, stats, model)
    model_family = model.family.name
    del model
    first, tried = plan_fit(lambda bs, ckpt: _timed_steps(cfg, labels, accelerator, bs, ckpt, steps, stats),
                            cfg.train.batch_size, cfg.train.grad_checkpointing)
    mem = "peak device memory" if accelerator.device.type == "cuda" else "peak process RSS"
    for t in [first, *tried]:
        label = f"train step, batch {t.batch_size}" + (", grad checkpointing" if t.grad_checkpointing else "")
        rows.append((label, f"{_rate(t.img_per_s)} img/s, {mem} {t.peak_mib:,.0f} MiB" if t.fits else
                     f"out of memory at {t.peak_mib:,.0f} MiB"))
    rows.append(("batch", advice(first, tried)))
    rows.append(("eval embedding", f"{_rate(eval_img_s)} img/s at batch {cfg.train.eval_batch_size}"))
    train_img_s = first.img_per_s or next((t.img_per_s for t in tried if t.fits), 0.0)
    est = {}
    if train_img_s:
        est = estimate_seconds(n_images, cfg, train_img_s, eval_img_s, build_s)
        rows.append(("estimate", f"{est['folds']} folds x {cfg.train.epochs} epochs x {est['steps_per_epoch']} steps "
                                 f"of {cfg.train.batch_size}: {_clock(est['epoch_s'])} per epoch, "
                                 f"{_clock(est['fold_s'])} per fold, {_clock(est['total_s'])} in all on one "
                                 f"{accelerator.device.type.upper()} process (N processes: about 1/N of it)"
                                 + (busy_note(first.cpu_share) if accelerator.device.type == "cpu" else "")))
    return {"lora": lora, "family": model_family, "trials": [asdict(t) for t in [first, *tried]],
            "device": _device_name(accelerator.device),
            "mixed_precision": precision, "train_img_per_s": train_img_s, "eval_img_per_s": eval_img_s,
            "estimate": est}


def busy_note(cpu_share: float) -> str:
    """Timed steps alone cannot tell a busy machine from a slow one; the CPU time the steps got can: on an
    idle machine a CPU step keeps every torch thread busy."""
    if cpu_share >= 0.6:
        return ""
    return (f". The machine was busy while it measured: the steps got {cpu_share:.0%} of the CPU time their "
            f"{torch.get_num_threads()} threads could use, so the estimate may be too long; run preflight again on an "
            f"idle machine (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


def _device_name(device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def _data_summary(cfg, labels) -> tuple[int, list[tuple[str, str]]]:
    """What `data check` reports, in short: counts and how many of each problem."""
    table, rep = load_release(cfg.data.root, labels.names, cfg.data.check_images)
    per_class = Counter(table["label"].dropna())
    smallest = min(per_class.get(c, 0) for c in labels.names)
    rows = [("data", f"{cfg.data.root}: {len(table):,} images, {int((table['y'] >= 0).sum()):,} labelled, "
                     f"{int(table['captions'].map(bool).sum()):,} captioned, "
                     f"{int(table['partners'].map(len).sum()) // 2:,} i2i links; smallest class {smallest}")]
    problems = {"unreadable images (skipped)": rep.bad_images, "annotations naming missing files": rep.missing,
                "unknown labels": rep.unknown_labels, "conflicting labels": rep.label_conflicts,
                "empty captions": rep.bad_captions, "duplicate JSON keys": rep.duplicate_keys,
                "same picture under two names": rep.content_duplicates, "file names fixed by case": rep.case_fixes}
    found = [f"{len(v)} {k}" for k, v in problems.items() if v]
    rows.append(("data problems", "; ".join(found) + " (python -m entrep.data check for the list)" if found else "none"))
    if smallest < cfg.cv.n_splits:
        rows.append(("folds", f"cv.n_splits={cfg.cv.n_splits} but a class has {smallest} labelled images: "
                              f"train.py will refuse; lower cv.n_splits"))
    return len(table), rows


def _synthetic_dataset(cfg, labels, n: int, work: int):
    """n random images at the cache's working size, a third captioned: what the step sees, minus decoding."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, work, work, 3), dtype=np.uint8)
    caps = [[f"{CAPTION} {i}"] if i % 3 == 0 else [] for i in range(n)]
    return TrainDataset(pixels, y=np.arange(n) % len(labels), captions=caps, groups=np.full(n, -1), index=np.arange(n),
                        labels=labels, hflip=True)


def _timed_steps(cfg, labels, accelerator, bs: int, ckpt: bool, steps: int, stats) -> Trial:
    """One warm-up and `steps` timed optimizer steps of the trainer's own TrainStep at batch `bs`."""
    console.print(f"[dim]timing 1 + {steps} train steps at batch {bs}{', grad checkpointing' if ckpt else ''} "
                  f"...[/dim]")
    c = copy.deepcopy(cfg)
    c.train.batch_size, c.train.grad_checkpointing, c.train.grad_accum = bs, ckpt, 1
    work = c.data.working_side(stats.size)
    cuda = accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = None
    try:
        step = TrainStep.for_dataset(c, accelerator, build_model(c, labels), _synthetic_dataset(c, labels, bs, work),
                                     stats, steps=steps + 1)
        step.model.train()
        loader = step.loader  # one batch of `bs` images; persistent workers serve it again each step
        batches = iter(lambda: next(iter(loader)), None)
        step(next(batches))
        if cuda:
            torch.cuda.synchronize()
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step(next(batches))
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        share = (time.process_time() - cpu0) / max(wall * torch.get_num_threads(), 1e-9)
        return Trial(bs, ckpt, True, bs * steps / wall, _peak_mib(cuda), min(1.0, share))
    except torch.OutOfMemoryError:
        return Trial(bs, ckpt, False, 0.0, _peak_mib(cuda))
    finally:
        del step
        accelerator.free_memory()
        if cuda:
            torch.cuda.empty_cache()


def _eval_rate(cfg, labels, accelerator, stats, model) -> float:
    console.print(f"[dim]timing evaluation at batch {cfg.train.eval_batch_size} ...[/dim]")
    work = cfg.data.working_side(stats.size)
    model = accelerator.prepare(model)
    n = cfg.train.eval_batch_size
    pixels = np.random.default_rng(0).integers(0, 256, (n, work, work, 3), dtype=np.uint8)
    embed_images(model, pixels[: min(n, 8)], accelerator, labels, stats, batch_size=n)  # warm-up
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    embed_images(model, pixels, accelerator, labels, stats, batch_size=n)
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t0)
    accelerator.free_memory()
    return rate


def _peak_mib(cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
