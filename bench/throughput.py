"""Side-by-side throughput of the kit against its own limits, one table, one run.

    python bench/throughput.py [--device cpu|cuda] [--quick | --smoke] [--skip ROW ...] [--json FILE]
    python bench/throughput.py --count-flops [--device cpu|cuda]   # GFLOP per image of the ViT-B/16 step

Rows that are compared with each other are built once each in one process (a group) and timed in
alternating windows, round after round, the order reversed every other round (A B C, C B A, ...); each
arm's window is sized to about the same duration, and a reference that several rows are compared with
comes back between them (T K N K O1 K O2 ..., `bracket`), so every compared pair has adjacent windows
in every round. A ratio is the median over rounds of that round's ratio (a row's window against the
reference window(s) next to it), with the min-max of the per-round ratios beside it: neighbouring
windows are close in time, so whatever else loads the machine (other users of a shared box) loads both
sides of a ratio alike. The absolute figures (img/s, ms) are medians over windows too, but they depend
on that load, and are labelled so. A window of an arm whose DataLoader has worker processes ends when
those workers have gone idle, so it pays for the batches its own steps asked them for, and the next
arm's window never runs beside them.

Each group runs in a fresh process (peak RSS is the group's). CPU uses the tiny model at 64 px; CUDA
uses ViT-B-16-quickgelu at 224 px with random weights (speed does not depend on the weights).

Groups and rows (ratio = row / its reference, in the same group):
- train: tensors (the same model and loss on one pre-made batch: the compute limit), kit (the real
  step: decoded cache, DataLoader, batched augmentations where speed.augment_on puts them, joint loss,
  backward, AdamW; vs tensors, target >= 0.95), naive PIL (decode + resize each PNG per step; vs kit),
  kit <option> (one speed option switched: augment on the device or in the loader, whichever auto is
  not on this device; channels_last; SDPA pinned to the math kernel; torch.compile; vs kit)
- infer: model (the bare forward), kit (embed_images: cache -> eval transform -> forward -> gather;
  vs model), kit merged (LoRA merged into the base), kit compile (vs kit)
- pipeline 224: the training input pipeline alone at 224 px for ViT-B/16 (decoded cache ->
  DataLoader -> BatchAugment on the device -> model-ready tensors, no model) at num_workers 0 and at
  the config's workers, against the img/s an H100 needs to keep ViT-B/16 at 40% MFU
- retrieval N: 1k queries x N gallery (d=512): the kit's chunked top-k vs the bare chunked matrix
  product, and with faiss installed its exact (flat) and approximate (IVF, HNSW) indexes, each in a
  group with the bare product, with index build time and recall@10 against the exact search
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


WORKERS = int(os.environ.get("BENCH_WORKERS", min(8, os.cpu_count() or 2)))
# --smoke (inherited by the spawned groups): each arm one window of one call at the smallest size; it
# checks that the rows run (the CPU rehearsal of the offline image), its figures are not measurements
SMOKE = os.environ.get("BENCH_SMOKE") == "1"


TRAIN_OPTIONS = {"augment on device": ["speed.augment_on=device"], "augment in loader": ["speed.augment_on=loader"],
                 "channels_last": ["speed.channels_last=true"], "sdpa math": ["speed.sdpa=math"],
                 "compile": ["speed.compile=true"]}
FAISS_ROWS = ["faiss flat", "faiss ivf", "faiss hnsw"]

# The img/s that keeps an H100 (SXM, dense bf16 peak 989 TFLOP/s, BF16_PEAK_TFLOPS) at 40% MFU on the
# ViT-B/16 recipe: 0.4 * 989e12 / (FLOPs of one kit train step per image). FLOPs are counted as flops_row
# counts them: torch.utils.flop_counter over one real step of configs/entrep_vitb16.yaml at 224 px (2 FLOPs
# per multiply-add; matmuls, convolutions, attention). `--count-flops` recounts it; on CPU here (2026-12,
# torch 2.14.1) a step is 299 GFLOP + 76.6 GFLOP per image, so 81.25 GFLOP/img at the config's batch 64
# -> 4,869 img/s. Why not 0.4 * 989e12 / (3 * 17.6e9) = 7.5k: the 17.6 "GFLOPs" quoted for ViT-B/16 at
# 224 px are multiply-adds (35.2 GFLOP forward as counted here), and with LoRA on a frozen base the
# backward pass computes input gradients but no weight gradients for the frozen matrices, so forward +
# backward is about 2x the forward (70 GFLOP), not 3x (106); the adapters, fusion, heads and the text
# tower (class prompts once per step, captions) add the rest. On CUDA the train kit row's own count
# replaces this constant.
VITB16_TRAIN_GFLOP_PER_IMG = 81.25
H100_BF16_PEAK_TFLOPS = 989.0
TARGET_MFU = 0.4


def faiss_installed() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# Alternating windows


class Arm:
    """One compared workload: `step()` does `items` units of work (images, queries); `calls` steps make
    one window (0: sized from the warm-up to about `window_s`); `pids`: worker processes whose work a window waits for (alternate adds the processes the
    arm started during its warm-up); `info`: figures of its build, reported in its row.
    (Plain classes, no dataclasses: bench/import_check.py loads this file without registering it.)"""

    def __init__(self, step: Callable[[], object], items: int, calls: int = 0, pids: set[int] | None = None,
                 info: dict | None = None):
        self.step, self.items, self.calls = step, items, calls
        self.pids, self.info = set(pids or ()), dict(info or {})


class Timing:
    """What `alternate` measured: each round as its windows in time order, (arm, rate in items/s); arms
    that failed, with the error; whatever each arm's build recorded (`probe`, faiss build time, ...); the
    built arms."""

    def __init__(self, rounds: list[list[tuple[str, float]]], errors: dict[str, str], info: dict[str, dict],
                 arms: dict[str, Arm] | None = None):
        self.rounds, self.errors, self.info, self.arms = rounds, errors, info, arms or {}

    @property
    def rates(self) -> dict[str, list[float]]:
        """Every window's rate of each arm that did not fail, in time order."""
        out: dict[str, list[float]] = {}
        for windows in self.rounds:
            for name, rate in windows:
                if name not in self.errors:
                    out.setdefault(name, []).append(rate)
        return out

    def round_ratios(self, name: str, ref: str) -> list[float]:
        """Per round, rate of `name` / rate of `ref` in the windows next to it (the geometric mean of
        the one before and the one after where both are `ref`; every `ref` window of the round where
        none is next to it); a round with several `name` windows gives their mean."""
        out = []
        for windows in self.rounds:
            mine, refs_all = [], [r for n, r in windows if n == ref]
            if not refs_all:
                continue
            for i, (n, rate) in enumerate(windows):
                if n != name:
                    continue
                near = [windows[j][1] for j in (i - 1, i + 1) if 0 <= j < len(windows) and windows[j][0] == ref]
                mine.append(rate / statistics.geometric_mean(near or refs_all))
            if mine:
                out.append(statistics.fmean(mine))
        return out


def bracket(ref: str, others: list[str]) -> list[str]:
    """A round's schedule in which each of `others` is timed next to a window of `ref`:
    o1 ref o2 ref o3 ... (the order is reversed every other round)."""
    out = []
    for i, o in enumerate(others):
        out += [ref, o] if i else [o]
    return out


def child_pids() -> set[int]:
    """This process's descendants (DataLoader workers, compile workers)."""
    try:
        import psutil
    except ImportError:  # accelerate depends on psutil; without it no window waits for workers
        return set()
    return {c.pid for c in psutil.Process().children(recursive=True)}


def _running(pids: set[int]) -> bool:
    """Whether any thread of `pids` is running or waiting for a CPU (state R) or in uninterruptible
    sleep (D); an idle DataLoader worker sleeps (S) on its index queue."""
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    s = f.read()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if s[s.rindex(b")") + 2:][:1] in (b"R", b"D"):
                return True
    return False


def wait_idle(pids: set[int], quiet_s: float = 0.003, timeout_s: float = 30.0) -> float:
    """Block until no thread of `pids` has run for `quiet_s` (seen every ~0.5 ms); returns the
    perf_counter time at which they went idle. Without /proc (not Linux): returns now."""
    if not pids or not os.path.isdir("/proc"):
        return time.perf_counter()
    start = time.perf_counter()
    idle_since = None
    while True:
        now = time.perf_counter()
        if _running(pids):
            idle_since = None
        elif idle_since is None:
            idle_since = now
        elif now - idle_since >= quiet_s:
            return idle_since
        if now - start > timeout_s:  # a worker that never idles: the window ends here
            return now
        time.sleep(0.0005)


def _window(arm: Arm, calls: int, sync) -> float:
    """Seconds of `calls` steps, up to when the arm's workers went idle (the batches its steps asked
    for are part of its work, and must not run during the next arm's window)."""
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        arm.step()
    sync()
    end = wait_idle(arm.pids) if arm.pids else time.perf_counter()
    return max(end - t0, 1e-9)


def alternate(arms: dict[str, Arm | Callable[[], Arm]], rounds: int, *, schedule: list[str] | None = None,
              window_s: float = 0.5, warmup: int = 1, sync: Callable[[], None] | None = None, probe=None,
              log=None) -> Timing:
    """Build and warm each arm (a builder is called here, in order), size its window to ~`window_s`,
    then time the windows of `schedule` (default: each arm once, in order; an arm may come back, as a
    reference does between the arms compared with it, see `bracket`) round after round, the order
    reversed every other round (A B C, C B A, ...: a load that drifts during a round is seen by each
    pair of neighbouring windows from both sides).

    probe(info: dict) -> context manager around each arm's build and warm-up (GPU memory); an arm whose
    build or step raises is reported in `errors` and left out from then on."""
    sync = sync or (lambda: None)
    if SMOKE:
        rounds, warmup = 1, min(warmup, 1)
    built: dict[str, Arm] = {}
    errors: dict[str, str] = {}
    info: dict[str, dict] = {}
    for name, arm in arms.items():
        info[name] = {}
        before = child_pids()
        try:
            with probe(info[name]) if probe else contextlib.nullcontext():
                arm = arm if isinstance(arm, Arm) else arm()
                info[name] |= arm.info
                t0 = time.perf_counter()
                for _ in range(warmup):
                    arm.step()
                sync()
                info[name]["warmup_s"] = time.perf_counter() - t0
                arm.pids = (child_pids() - before) | arm.pids
                if SMOKE:
                    arm.calls = 1
                elif not arm.calls:  # a step longer than a window (a 1M gallery) needs no measuring
                    long = info[name]["warmup_s"] / max(1, warmup) > window_s
                    per_call = window_s if long else _window(arm, 2, sync) / 2
                    arm.calls = max(1, min(500, round(window_s / per_call)))
        except Exception as e:  # noqa: BLE001  (the table shows a failed row instead of losing the group)
            errors[name] = f"{type(e).__name__}: {e}"
            continue
        built[name] = arm
        if log:
            log(f"  {name}: ready, {arm.calls} call{'s' if arm.calls > 1 else ''} per window")
    timed = []
    for r in range(rounds):
        order = [n for n in (schedule or list(arms)) if n in built and n not in errors]
        windows = []
        for name in order if r % 2 == 0 else order[::-1]:
            arm = built[name]
            try:
                windows.append((name, arm.items * arm.calls / _window(arm, arm.calls, sync)))
            except Exception as e:  # noqa: BLE001
                errors[name] = f"{type(e).__name__}: {e}"
        timed.append(windows)
    return Timing(timed, errors, info, built)


def ratio_stats(per_round: list[float]) -> dict:
    """Median, min and max of per-round ratios."""
    if not per_round:
        return {}
    return {"ratio": statistics.median(per_round), "ratio_min": min(per_round), "ratio_max": max(per_round),
            "rounds": len(per_round)}


def summarize(timing: Timing, refs: dict[str, str], unit: str = "img/s", items_per_unit: float = 1.0) -> dict:
    """Rows of a group: each arm's median rate (load-dependent) and, against its reference, the
    per-round ratio statistics. unit "img/s" reports the rate; "ms/1k queries" the time per 1k items,
    and its ratio is then row time / reference time."""
    rows = {}
    for name, info in timing.info.items():
        if name in timing.errors:
            rows[name] = {"error": timing.errors[name]}
            continue
        rate = statistics.median(timing.rates[name])
        row = {unit: rate if unit == "img/s" else 1000 * items_per_unit / rate}
        ref = refs.get(name)
        if ref and ref in timing.rates:
            per_round = timing.round_ratios(name, ref)
            row |= ratio_stats(per_round if unit == "img/s" else [1 / x for x in per_round]) | {"ref": ref}
        row |= {k: v for k, v in info.items() if k != "warmup_s"}
        rows[name] = row
    return rows


# ---------------------------------------------------------------------------------------------------
# Workloads


def make_pngs(folder: Path, n: int) -> list[str]:
    """n release-like 640x480 PNGs from the demo renderer."""
    import numpy as np
    from PIL import Image

    from entrep.data.synthetic import _case, render
    from entrep.labels import ENTREP_CLASSES

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        label = ENTREP_CLASSES[i % 7]
        p = folder / f"{i:05d}.png"
        Image.fromarray(render(label, _case(rng, label), 480)).resize((640, 480)).save(p)
        paths.append(str(p))
    return paths


def bench_config(device: str, overrides=(), big: bool | None = None):
    from entrep.config import load_config

    big = device == "cuda" if big is None else big
    return load_config("configs/entrep_vitb16.yaml" if big else "configs/demo.yaml",
                       ["model.pretrained=", f"data.num_workers={WORKERS}",
                        "train.batch_size=" + ("64" if big else "8" if SMOKE else "32"),
                        "train.mixed_precision=" + ("auto" if big else "no"), *overrides])


def cuda_sync(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def gpu_probe(device: str):
    """Per arm on CUDA: the peak of its own allocations above what was allocated before it was built
    (its model, optimizer state and activations; other arms' models are not counted)."""
    if device != "cuda":
        return None
    import torch

    @contextlib.contextmanager
    def probe(info: dict):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            torch.cuda.synchronize()
            info["gpu_peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return probe


@contextlib.contextmanager
def compile_at_prepare(accelerator, cfg):
    """speed.compile for one arm in a process whose Accelerator was made without it. Accelerate keeps its
    dynamo plugin in process-wide state (set by the first Accelerator) and reads it in prepare(), so the
    plugin make_accelerator would have passed is put there for this arm's prepare() only."""
    from accelerate.utils import TorchDynamoPlugin

    state = accelerator.state
    old = state.dynamo_plugin
    state.dynamo_plugin = TorchDynamoPlugin(backend="inductor", mode=cfg.speed.compile_mode)
    try:
        yield
    finally:
        state.dynamo_plugin = old


class Kit:
    """What the arms of one group share: one Accelerator (Accelerate allows one state per process), the
    labels, the PNGs and their decoded cache."""

    def __init__(self, device: str, folder: str, big: bool | None = None):
        from entrep.engine import make_accelerator
        from entrep.labels import LabelSet

        self.device, self.folder = device, folder
        self.big = device == "cuda" if big is None else big
        self.cfg = bench_config(device, big=self.big)
        self._cached = {}
        self.accelerator = make_accelerator(self.cfg, cpu=device == "cpu")
        self.labels = LabelSet.from_config(self.cfg.labels)
        self.paths = sorted(str(p) for p in Path(folder).glob("*.png"))
        self.sync = cuda_sync(device)

    def model(self, cfg):
        from entrep.model.backbone import image_stats
        from entrep.model.entrep_clip import build_model

        model = build_model(cfg, self.labels)
        return model, image_stats(model.base)

    def cached(self, side: int):
        from entrep.data.images import ImageCache
        from entrep.data.release import file_sha1

        if side not in self._cached:
            self._cached[side] = ImageCache(Path(self.folder) / "cache", side).pixels(
                self.paths, [file_sha1(Path(p)) for p in self.paths])
        return self._cached[side]

    def train_dataset(self, pixels, rows: int):
        """The PNGs repeated to `rows` rows: an epoch of many batches, as in a real fold, rather than a
        loader that restarts (and drains its workers' prefetch) every few batches."""
        import numpy as np

        from entrep.data.dataset import TrainDataset

        n = len(self.paths)
        idx = np.arange(max(rows, n)) % n
        y = idx % len(self.labels)
        caps = [["erythema on the vocal cords"] if i % 3 == 0 else [] for i in idx]
        pixels = NaivePixels([self.paths[i] for i in idx], pixels.size) if isinstance(pixels, NaivePixels) \
            else pixels[idx]
        return TrainDataset(pixels, y=y, captions=caps, groups=np.arange(len(idx)), index=np.arange(len(idx)),
                            labels=self.labels, hflip=True)


class NaivePixels:
    """What a plain loop does: decode and resize the PNG on every access."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from entrep.data.images import decode_image

        return decode_image(self.paths[i], self.size)


def forever(loader):
    while True:
        yield from loader


def train_arm(kit: Kit, kind: str, overrides=()) -> Arm:
    from entrep.engine import TrainStep

    if kind == "tensors":  # the limit is fed model-ready tensors: augmented in the loader, once
        overrides = [*overrides, "speed.augment_on=loader", "data.num_workers=0"]
    cfg = bench_config(kit.device, overrides, big=kit.big)
    model, stats = kit.model(cfg)
    work = cfg.data.working_side(stats.size)
    pixels = NaivePixels(kit.paths, work) if kind == "naive" else kit.cached(work)
    bs = cfg.train.batch_size
    ds = kit.train_dataset(pixels, 64 * bs)
    with compile_at_prepare(kit.accelerator, cfg) if cfg.speed.compile else contextlib.nullcontext():
        train_step = TrainStep.for_dataset(cfg, kit.accelerator, model, ds, stats, steps=10**6)
    train_step.model.train()
    if kind == "tensors":
        fixed = next(iter(train_step.loader))
        batches = iter(lambda: dict(fixed), None)
    else:
        batches = forever(train_step.loader)

    def step():
        train_step(next(batches))

    return Arm(step, bs)


def group_train(device: str, quick: bool, folder: str, skip: list[str]) -> dict:
    kit = Kit(device, folder)
    options = {o: v for o, v in TRAIN_OPTIONS.items() if o not in skip
               # the option that is the kit itself on this device (auto: on the device on CUDA, else in the loader)
               and o != ("augment on device" if device == "cuda" else "augment in loader")}
    arms = {"train tensors": lambda: train_arm(kit, "tensors"), "train kit": lambda: train_arm(kit, "kit"),
            "train naive": lambda: train_arm(kit, "naive"),
            **{f"train kit {o}": (lambda v=v: train_arm(kit, "kit", v)) for o, v in options.items()}}
    # every arm next to a window of the kit (tensors, naive and each option are compared with it)
    schedule = bracket("train kit", [n for n in arms if n != "train kit"])
    timing = alternate(arms, rounds=5 if quick else 9, schedule=schedule, window_s=0.5 if quick else 1.0, warmup=2,
                       sync=kit.sync, probe=gpu_probe(device), log=log)
    refs = {"train kit": "train tensors", "train naive": "train kit",
            **{f"train kit {o}": "train kit" for o in options}}
    rows = summarize(timing, refs)
    if device == "cuda" and "img/s" in rows.get("train kit", {}):
        rows["train kit"] |= flops_row(timing.arms["train kit"].step, kit.cfg.train.batch_size,
                                       rows["train kit"]["img/s"])
    return rows


def flops_row(step, batch_size: int, img_per_s: float) -> dict:
    """Achieved TFLOP/s and the fraction of the card's dense bf16 peak (MFU). FLOPs per image are
    counted by torch.utils.flop_counter over one real train step (forward + backward: matmuls,
    convolutions and attention; elementwise work is not counted, so MFU is a slight underestimate)."""
    import torch

    per_image = count_flops(step, batch_size)
    achieved = per_image * img_per_s / 1e12
    out = {"GFLOP/img": per_image / 1e9, "TFLOP/s": achieved}
    peak = peak_bf16_tflops(torch.cuda.get_device_name())
    if peak:
        out["MFU"] = achieved / peak
    return out


def count_flops(step, batch_size: int) -> float:
    """FLOPs per image of one call of `step` (2 per multiply-add), by torch.utils.flop_counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return counter.get_total_flops() / batch_size


# Dense bf16 tensor-core peaks (no sparsity) from NVIDIA's data sheets, most specific name first;
# other cards: set BENCH_PEAK_TFLOPS, or the table shows no MFU.
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H200": 989.0, "H100": H100_BF16_PEAK_TFLOPS, "A100": 312.0, "L40S": 362.0,
                    "L4": 121.0}


def peak_bf16_tflops(name: str) -> float:
    if os.environ.get("BENCH_PEAK_TFLOPS"):
        return float(os.environ["BENCH_PEAK_TFLOPS"])
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), 0.0)


def needed_img_per_s(gflop_per_img: float) -> float:
    """img/s at which an H100 runs TARGET_MFU of its dense bf16 peak, at `gflop_per_img` per image."""
    return TARGET_MFU * H100_BF16_PEAK_TFLOPS * 1e12 / (gflop_per_img * 1e9)


def infer_arm(kit: Kit, kind: str, shared: dict, overrides=()) -> Arm:
    import torch

    from entrep.embedding import embed_images

    cfg = bench_config(kit.device, overrides, big=kit.big)
    if kind in ("model", "kit") and "model" in shared:  # the bare forward and the kit share one model
        model, stats = shared["model"]
    else:
        model, stats = kit.model(cfg)
        with compile_at_prepare(kit.accelerator, cfg) if cfg.speed.compile else contextlib.nullcontext():
            model = kit.accelerator.prepare(model)
        model.eval()
        if kind in ("model", "kit"):
            shared["model"] = model, stats
    bs = cfg.train.eval_batch_size
    if kind == "model":
        x = torch.randn(bs, 3, stats.size, stats.size, device=kit.accelerator.device)

        @torch.inference_mode()
        def step():
            with kit.accelerator.autocast():
                model(x)
        return Arm(step, bs)
    pixels = kit.cached(cfg.data.working_side(stats.size))
    if kind == "kit merged":
        from entrep.model.lora import merged

        merged(kit.accelerator.unwrap_model(model).clip).__enter__()  # stays merged for the whole group
    return Arm(lambda: embed_images(model, pixels, kit.accelerator, kit.labels, stats, batch_size=bs), len(kit.paths))


def group_infer(device: str, quick: bool, folder: str, skip: list[str]) -> dict:
    kit = Kit(device, folder)
    shared: dict = {}
    arms = {"infer model": lambda: infer_arm(kit, "model", shared), "infer kit": lambda: infer_arm(kit, "kit", shared),
            "infer kit merged": lambda: infer_arm(kit, "kit merged", shared)}
    if "compile" not in skip:
        arms["infer kit compile"] = lambda: infer_arm(kit, "kit compile", shared, ["speed.compile=true"])
    timing = alternate(arms, rounds=5 if quick else 9, schedule=bracket("infer kit", [n for n in arms if n != "infer kit"]),
                       window_s=0.5 if quick else 1.0, warmup=1, sync=kit.sync, probe=gpu_probe(device), log=log)
    return summarize(timing, {"infer kit": "infer model", "infer kit merged": "infer kit",
                              "infer kit compile": "infer kit"})


def pipeline_arm(kit: Kit, workers: int) -> Arm:
    """The ViT-B/16 training input at 224 px without the model: the kit's train_pipeline with the
    augmentation on the device (the loader ships uint8), prepared by Accelerate (which moves each batch
    to the device), then BatchAugment there; a step ends with the model-ready float batch."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from entrep.engine import train_pipeline

    cfg = bench_config(kit.device, [f"data.num_workers={workers}", "speed.augment_on=device"], big=True)
    size = 224
    pixels = kit.cached(cfg.data.working_side(size))
    bs = cfg.train.batch_size
    ds = kit.train_dataset(pixels, 64 * bs)
    loader, augment = train_pipeline(ds, cfg, kit.accelerator.device, (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, size))
    batches = forever(kit.accelerator.prepare(loader))

    def step():
        x = augment(next(batches)["image"])
        assert x.shape == (bs, 3, size, size) and x.dtype.is_floating_point

    return Arm(step, bs)


def group_pipeline(device: str, quick: bool, folder: str) -> dict:
    from entrep.config import load_config

    kit = Kit(device, folder, big=True)
    config_workers = load_config("configs/entrep_vitb16.yaml").data.num_workers  # not the bench's WORKERS
    zero, many = "pipeline 224 workers 0", f"pipeline 224 workers {config_workers}"
    timing = alternate({zero: lambda: pipeline_arm(kit, 0), many: lambda: pipeline_arm(kit, config_workers)},
                       rounds=5 if quick else 9, window_s=0.5 if quick else 1.0, warmup=2, sync=kit.sync, log=log)
    return summarize(timing, {many: zero})


def retrieval_arms(device: str, n_gallery: int, kind: str) -> dict:
    import torch
    import torch.nn.functional as F

    from entrep.config import InferConfig
    from entrep.retrieval import topk_cosine

    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    q = F.normalize(torch.randn(1000, 512, generator=g), dim=-1).to(dev)
    gal = F.normalize(torch.randn(n_gallery, 512, generator=g), dim=-1).to(dev)
    bound = InferConfig().max_sim_bytes
    rows = max(1, bound // (n_gallery * 4))

    @torch.inference_mode()
    def bare():  # the exact-search limit: the same blocks of the matrix product, nothing else
        for s in range(0, q.shape[0], rows):
            q[s:s + rows] @ gal.t()

    shape = {"bound_MiB": bound / 2**20, "block_MiB": rows * n_gallery * 4 / 2**20}
    arms = {"matmul": Arm(bare, 1000, info=dict(shape))}
    if kind == "kit":
        arms["kit"] = Arm(lambda: topk_cosine(q, gal, 10, None, bound), 1000, info=dict(shape))
    else:
        from entrep.retrieval import faiss_index, faiss_topk

        def build():
            t0 = time.perf_counter()
            index = faiss_index(gal, kind.split()[1], InferConfig().faiss_nprobe)
            built = time.perf_counter() - t0
            step = lambda: faiss_topk(index, q, 10)
            _, exact = topk_cosine(q, gal, 10, None, bound)
            _, found = step()
            recall = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist())) / exact.numel()
            return Arm(step, 1000, info={"build_s": built, "recall@10": recall})
        arms[kind] = build
    return arms


def group_retrieval(device: str, quick: bool, n_gallery: int, kind: str) -> dict:
    """`kind` ("kit" or a faiss row) alternated with the bare chunked product at one gallery size."""
    import torch

    timing = alternate(retrieval_arms(device, n_gallery, kind), rounds=5 if quick else 7, warmup=1,
                       sync=cuda_sync(device), probe=gpu_probe(device))
    rows = summarize(timing, {kind: "matmul"}, unit="ms/1k queries", items_per_unit=1000)
    out = {f"retrieval {n_gallery:,} {k}": v for k, v in rows.items()}
    if device == "cuda":
        for v in out.values():
            v.setdefault("gpu_peak_MiB", torch.cuda.max_memory_allocated() / 2**20)
    return out


# ---------------------------------------------------------------------------------------------------
# Groups in child processes, the table


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _child(fn, args, queue):
    try:
        if os.environ.get("BENCH_THREADS"):  # --threads, inherited through the environment
            import torch

            torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
        rows = fn(*args)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for r in rows.values():
            r["peak_rss_MiB"] = rss  # the group's process: every arm of the group is in it
        queue.put(rows)
    except Exception as e:  # noqa: BLE001  (the table shows a failed group instead of dying)
        queue.put({"error": f"{type(e).__name__}: {e}"})


def run_group(fn, names: list[str], *args) -> dict:
    """fn(*args) in a fresh process; a group that fails as a whole marks each of `names` failed."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, queue))
    p.start()
    res = queue.get()
    p.join()
    if set(res) == {"error"}:
        return {n: {"error": res["error"]} for n in names}
    return res


def count_main(device: str) -> int:
    """GFLOP per image of one kit train step of configs/entrep_vitb16.yaml (224 px) at its batch size.
    On CPU a step at batch 64 holds ~13 GB, so it is counted at batches 8 and 16 and extrapolated: a
    step's FLOPs are a + b * batch (the class prompts through the text tower are per step, the rest per
    image), so two batch sizes give the count at any other exactly."""
    from entrep.config import load_config

    full = load_config("configs/entrep_vitb16.yaml").train.batch_size
    sizes = [full] if device == "cuda" else [8, 16]
    counted = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_pngs(Path(tmp), max(sizes))
        kit = Kit(device, tmp, big=True)
        for bs in sizes:
            arm = train_arm(kit, "kit", ["data.num_workers=0", f"train.batch_size={bs}"])
            arm.step()
            counted[bs] = count_flops(arm.step, bs) * bs  # FLOPs of the step
            print(f"batch {bs}: {counted[bs] / 1e9:,.1f} GFLOP per step, {counted[bs] / bs / 1e9:.2f} per image")
            del arm
    if len(sizes) == 1:
        g = counted[full] / full / 1e9
    else:
        (b1, f1), (b2, f2) = sorted(counted.items())
        per_image = (f2 - f1) / (b2 - b1)
        g = (f1 + per_image * (full - b1)) / full / 1e9
        print(f"per step {(f1 - per_image * b1) / 1e9:,.1f} GFLOP + per image {per_image / 1e9:.2f} GFLOP")
    print(f"ViT-B/16 kit train step (configs/entrep_vitb16.yaml, 224 px, batch {full}): {g:.2f} GFLOP/img; "
          f"an H100 at {TARGET_MFU:.0%} MFU of {H100_BF16_PEAK_TFLOPS:g} TFLOP/s needs {needed_img_per_s(g):,.0f} img/s")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and images, no 1M gallery")
    ap.add_argument("--smoke", action="store_true", help="--quick with each arm timed once at batch 8 on CPU and "
                    "a 10k gallery only: that the rows run, not their speed")
    ap.add_argument("--images", type=int, default=0, help="PNGs to make (default 256, 96 with --quick, 16 with --smoke)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--skip", nargs="*", default=[], help="rows to leave out: " +
                    " ".join([*TRAIN_OPTIONS, "pipeline", "hnsw-1m"]))
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads in each group's process "
                    "(default: torch's own, as the kit runs). On an oversubscribed CPU box 1 keeps a descheduled "
                    "thread from stalling every parallel op, which makes windows far less noisy")
    ap.add_argument("--count-flops", action="store_true", help="only count GFLOP per image of the ViT-B/16 "
                    "kit train step (its img/s need at 40%% MFU of an H100 follows)")
    args = ap.parse_args()
    os.chdir(Path(__file__).resolve().parents[1])
    if args.count_flops:
        return count_main(args.device)
    if args.threads:
        os.environ["BENCH_THREADS"] = str(args.threads)
    if args.smoke:
        global SMOKE
        SMOKE = args.quick = True
        os.environ["BENCH_SMOKE"] = "1"  # the groups run in spawned processes
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        n_img = args.images or (16 if args.smoke else 96 if args.quick else 256)
        make_pngs(Path(tmp), n_img)
        rows = {}
        names = ["train tensors", "train kit", "train naive", *(f"train kit {o}" for o in TRAIN_OPTIONS)]
        log("group train")
        rows |= run_group(group_train, names, args.device, args.quick, tmp, args.skip)
        log("group infer")
        rows |= run_group(group_infer, ["infer model", "infer kit", "infer kit merged", "infer kit compile"],
                          args.device, args.quick, tmp, args.skip)
        if "pipeline" not in args.skip:
            log("group pipeline 224")
            rows |= run_group(group_pipeline, ["pipeline 224"], args.device, args.quick, tmp)
        sizes = [10_000] if args.smoke else [10_000, 100_000] + ([] if args.quick else [1_000_000])
        searches = ["kit"] + (FAISS_ROWS if faiss_installed() else [])
        for n in sizes:
            for kind in searches:
                if kind == "faiss hnsw" and n > 100_000 and "hnsw-1m" in args.skip:
                    continue
                log(f"group retrieval {n:,} {kind}")
                got = run_group(group_retrieval, [f"retrieval {n:,} {kind}"], args.device, args.quick, n, kind)
                if kind != "kit":  # the bare product's absolute figure is the kit group's; this one is the ratio's
                    got.pop(f"retrieval {n:,} matmul", None)
                rows |= got

    # the input pipeline against what an H100 needs: FLOPs per image counted on this run's CUDA train
    # kit row when there is one, else the constant counted once (VITB16_TRAIN_GFLOP_PER_IMG)
    gflop = rows.get("train kit", {}).get("GFLOP/img") or VITB16_TRAIN_GFLOP_PER_IMG
    need = needed_img_per_s(gflop)
    for name, r in rows.items():
        if name.startswith("pipeline") and "img/s" in r:
            r |= {"need_img/s": need, "feed/need": r["img/s"] / need}

    targets = {"train kit": ">= 0.95", "train naive": "(naive / kit)",
               **{f"train kit {o}": "(/ kit)" for o in TRAIN_OPTIONS},
               "infer kit": "(/ model)", "infer kit merged": "(merged / unmerged)", "infer kit compile": "(/ kit)"}
    t = Table(title=f"entrep throughput, {args.device}, {platform.node()}, {time.strftime('%Y-%m-%d')}, "
                    f"torch {__import__('torch').__version__}, {args.threads or 'default'} threads, "
                    f"{time.perf_counter() - t_start:.0f} s")
    for col in ("row", "value (load-dependent)", "ratio [min-max]", "target", "peak RSS MiB", "notes"):
        t.add_column(escape(col), justify="left" if col in ("row", "notes") else "right")
    shown = ("img/s", "ms/1k queries", "ratio", "ratio_min", "ratio_max", "rounds", "ref", "peak_rss_MiB",
             "need_img/s", "feed/need")
    for name, r in rows.items():
        if "error" in r:
            t.add_row(name, "failed", "", "", "", escape(r["error"]))
            continue
        key = "img/s" if "img/s" in r else "ms/1k queries"
        ratio = f"{r['ratio']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]" if "ratio" in r else ""
        target = targets.get(name, "<= 1.25" if name.endswith(" kit") else f"(/ {r['ref'].split()[-1]})"
                             if "ref" in r else "")
        if name.startswith("pipeline"):
            target = "(/ workers 0)" if "ratio" in r else ""
        notes = [f"{k} {v:.3g}" for k, v in r.items() if k not in shown]
        if "feed/need" in r:
            notes.insert(0, f"{r['feed/need']:.2g} of the {r['need_img/s']:,.0f} img/s an H100 needs")
        t.add_row(name, f"{r[key]:,.1f} {key}", escape(ratio), target, f"{r['peak_rss_MiB']:,.0f}", ", ".join(notes))
    t.caption = escape(f"ratio: median over rounds of row / reference timed in alternating windows in one process "
                 f"[min-max of the rounds]; value: median rate, depends on what else loads the machine; "
                 f"peak RSS: the row's group process; H100 need: {TARGET_MFU:.0%} x {H100_BF16_PEAK_TFLOPS:g} "
                 f"TFLOP/s / {gflop:.1f} GFLOP per image; " +
                 (f"faiss {__import__('faiss').__version__}" if faiss_installed() else "faiss not installed"))
    Console(width=180).print(t)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
