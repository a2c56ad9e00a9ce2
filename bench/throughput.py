"""Side-by-side throughput of the kit against its own limits, one table, one run.

    python bench/throughput.py [--device cpu|cuda] [--quick | --smoke]

Each row runs in a fresh process (so its peak RSS is its own); each figure is the median over
timed windows after warm-up. CPU uses the tiny model at 64 px; CUDA uses ViT-B-16-quickgelu at
224 px with random weights (speed does not depend on the weights).

Rows (ratio = row / its reference):
- train kit          the kit's real step: images from the decoded cache, DataLoader, batched
                     augmentations where speed.augment_on puts them (auto), joint loss, backward, AdamW
- train tensors      the same model and loss on pre-made tensors: the compute limit (target >= 0.95)
- train naive PIL    the same step fed by PIL decoding + resizing each PNG per step
- train kit <option> the kit with one speed option switched (augment on the device, channels_last,
                     SDPA pinned to the math kernel, torch.compile), vs train kit
- infer kit          embed_images (cache -> eval transform -> forward -> gather), vs the model alone
- infer kit <option> LoRA merged into the base (infer.merge_lora=true), torch.compile, vs infer kit
- retrieval N        1k queries x N gallery (d=512) chunked top-k vs the bare chunked matrix product
                     (the kit's ratio is against the product timed in alternation in the same process);
                     with faiss installed also its exact (flat) and approximate (IVF, HNSW) indexes,
                     with index build time and recall@10 against the exact search
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


WORKERS = int(os.environ.get("BENCH_WORKERS", min(8, os.cpu_count() or 2)))
# --smoke (inherited by the spawned rows): each row once at the smallest size; it checks that the rows
# run (the CPU rehearsal of the offline image), its figures are not measurements
SMOKE = os.environ.get("BENCH_SMOKE") == "1"


TRAIN_OPTIONS = {"augment on device": ["speed.augment_on=device"], "channels_last": ["speed.channels_last=true"],
                 "sdpa math": ["speed.sdpa=math"], "compile": ["speed.compile=true"]}
FAISS_ROWS = ["faiss flat", "faiss ivf", "faiss hnsw"]


def faiss_installed() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def median_rate(step, items_per_call: int, warmup: int, windows: int, calls: int, sync) -> float:
    if SMOKE:
        warmup, windows, calls = min(warmup, 1), 1, 1
    for _ in range(warmup):
        step()
    sync()
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        sync()
        rates.append(items_per_call * calls / (time.perf_counter() - t0))
    return statistics.median(rates)


def make_pngs(folder: Path, n: int) -> list[str]:
    """n release-like 640x480 PNGs from the demo renderer."""
    import numpy as np
    from PIL import Image

    from entrep.data.demo import _case, render
    from entrep.labels import ENTREP_CLASSES

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        label = ENTREP_CLASSES[i % 7]
        p = folder / f"{i:05d}.png"
        Image.fromarray(render(label, _case(rng, label), 480)).resize((640, 480)).save(p)
        paths.append(str(p))
    return paths


def setup(device: str, overrides=()):
    import torch

    from entrep.config import load_config
    from entrep.engine import make_accelerator
    from entrep.labels import LabelSet
    from entrep.model.backbone import image_stats
    from entrep.model.entrep_clip import build_model

    big = device == "cuda"
    cfg = load_config("configs/entrep_vitb16.yaml" if big else "configs/demo.yaml",
                      ["model.pretrained=", f"data.num_workers={WORKERS}", "train.batch_size=" + ("64" if big else "8" if SMOKE else "32"),
                       "train.mixed_precision=" + ("auto" if big else "no"), *overrides])
    accelerator = make_accelerator(cfg, cpu=device == "cpu")
    labels = LabelSet.from_config(cfg.labels)
    model = build_model(cfg, labels)
    stats = image_stats(model.base)
    sync = torch.cuda.synchronize if big else (lambda: None)
    return cfg, accelerator, labels, model, stats, sync


class NaivePixels:
    """What a plain loop does: decode and resize the PNG on every access."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from entrep.data.images import decode_image

        return decode_image(self.paths[i], self.size)


def row_train(kind: str, device: str, quick: bool, folder: str, overrides=()) -> dict:
    import numpy as np
    import torch

    from entrep.data.dataset import TrainDataset
    from entrep.data.images import ImageCache
    from entrep.data.release import file_sha1
    from entrep.engine import TrainStep

    if kind == "tensors":  # the limit is fed model-ready tensors: augmented in the loader, once
        overrides = [*overrides, "speed.augment_on=loader"]
    cfg, accelerator, labels, model, stats, sync = setup(device, overrides)
    paths = sorted(str(p) for p in Path(folder).glob("*.png"))
    n = len(paths)
    y = np.arange(n) % len(labels)
    caps = [["erythema on the vocal cords"] if i % 3 == 0 else [] for i in range(n)]
    work = cfg.data.working_side(stats.size)
    if kind == "naive":
        pixels = NaivePixels(paths, work)
    else:
        pixels = ImageCache(Path(folder) / "cache", work).pixels(paths, [file_sha1(Path(p)) for p in paths])
    ds = TrainDataset(pixels, y=y, captions=caps, groups=np.arange(n), index=np.arange(n), labels=labels, hflip=True)
    bs = cfg.train.batch_size
    train_step = TrainStep.for_dataset(cfg, accelerator, model, ds, stats, steps=10**6)
    train_step.model.train()
    if kind == "tensors":
        fixed = next(iter(train_step.loader))
        batches = iter(lambda: dict(fixed), None)
    else:
        def forever():
            while True:
                yield from train_step.loader
        batches = forever()

    def step():
        train_step(next(batches))

    calls = 3 if quick else 6
    rate = median_rate(step, bs, warmup=2, windows=3 if quick else 5, calls=calls, sync=sync)
    out = {"img/s": rate}
    if device == "cuda" and kind == "kit" and not overrides:
        out |= flops_row(step, bs, rate)
    return out


def flops_row(step, batch_size: int, img_per_s: float) -> dict:
    """Achieved TFLOP/s and the fraction of the card's dense bf16 peak (MFU). FLOPs per image are
    counted by torch.utils.flop_counter over one real train step (forward + backward: matmuls,
    convolutions and attention; elementwise work is not counted, so MFU is a slight underestimate)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    torch.cuda.synchronize()
    per_image = counter.get_total_flops() / batch_size
    achieved = per_image * img_per_s / 1e12
    out = {"GFLOP/img": per_image / 1e9, "TFLOP/s": achieved}
    peak = peak_bf16_tflops(torch.cuda.get_device_name())
    if peak:
        out["MFU"] = achieved / peak
    return out


# Dense bf16 tensor-core peaks (no sparsity) from NVIDIA's data sheets, most specific name first;
# other cards: set BENCH_PEAK_TFLOPS, or the table shows no MFU.
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def peak_bf16_tflops(name: str) -> float:
    if os.environ.get("BENCH_PEAK_TFLOPS"):
        return float(os.environ["BENCH_PEAK_TFLOPS"])
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), 0.0)


def row_infer(kind: str, device: str, quick: bool, folder: str, overrides=()) -> dict:
    import torch

    from entrep.data.images import ImageCache
    from entrep.data.release import file_sha1
    from entrep.embedding import embed_images

    cfg, accelerator, labels, model, stats, sync = setup(device, overrides)
    size = stats.size
    paths = sorted(str(p) for p in Path(folder).glob("*.png"))
    model = accelerator.prepare(model)
    model.eval()
    bs = cfg.train.eval_batch_size
    if kind.startswith("kit"):
        pixels = ImageCache(Path(folder) / "cache", cfg.data.working_side(size)).pixels(
            paths, [file_sha1(Path(p)) for p in paths])
        if kind == "kit merged":
            from entrep.model.lora import merged

            merged(accelerator.unwrap_model(model).clip).__enter__()  # stays merged for the whole row
        step = lambda: embed_images(model, pixels, accelerator, labels, stats, batch_size=bs)  # noqa: E731
        n = len(paths)
    else:
        x = torch.randn(bs, 3, size, size, device=accelerator.device)

        @torch.inference_mode()
        def step():
            with accelerator.autocast():
                model(x)
        n = bs
    rate = median_rate(step, n, warmup=1, windows=3 if quick else 5, calls=1 if kind.startswith("kit") else 4, sync=sync)
    return {"img/s": rate}


def row_retrieval(kind: str, device: str, quick: bool, n_gallery: int) -> dict:
    import torch
    import torch.nn.functional as F

    from entrep.config import InferConfig
    from entrep.retrieval import topk_cosine

    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    q = F.normalize(torch.randn(1000, 512, generator=g), dim=-1).to(dev)
    gal = F.normalize(torch.randn(n_gallery, 512, generator=g), dim=-1).to(dev)
    bound = InferConfig().max_sim_bytes
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = max(1, bound // (n_gallery * 4))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    @torch.inference_mode()
    def bare():  # the exact-search limit: the same blocks of the matrix product, nothing else
        for s in range(0, q.shape[0], rows):
            q[s:s + rows] @ gal.t()

    out = {}
    if kind == "kit":
        # Timed in alternation with the bare product, in this process: run-to-run drift on a shared
        # machine (+-30% between processes here) would otherwise swamp a 10% overhead.
        kit = lambda: topk_cosine(q, gal, 10, None, bound)  # noqa: E731
        kit(), bare()
        sync()
        times = {"kit": [], "bare": []}
        for _ in range(5):
            for name, fn in (("kit", kit), ("bare", bare)):
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
        out = {"ms/1k queries": 1000 * statistics.median(times["kit"]),
               "matmul_ms_alternated": 1000 * statistics.median(times["bare"])}
        out["ratio_alternated"] = out["ms/1k queries"] / out["matmul_ms_alternated"]
        step = None
    elif kind.startswith("faiss"):
        from entrep.retrieval import faiss_index, faiss_topk

        t0 = time.perf_counter()
        index = faiss_index(gal, kind.split()[1], InferConfig().faiss_nprobe)
        out["build_s"] = time.perf_counter() - t0
        step = lambda: faiss_topk(index, q, 10)  # noqa: E731
        _, exact = topk_cosine(q, gal, 10, None, bound)
        _, found = step()
        out["recall@10"] = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist())) / exact.numel()
    else:
        step = bare
    if step is not None:
        out = {"ms/1k queries": 1000 * 1000 / median_rate(step, 1000, warmup=1, windows=3, calls=1, sync=sync), **out}
    if not kind.startswith("faiss"):
        out |= {"bound_MiB": bound / 2**20, "block_MiB": rows * n_gallery * 4 / 2**20}
    if device == "cuda":
        out["gpu_peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _child(fn, args, queue):
    try:
        res = fn(*args)
        res["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            res.setdefault("gpu_peak_MiB", torch.cuda.max_memory_allocated() / 2**20)
        queue.put(res)
    except Exception as e:  # the table shows a failed row instead of dying
        queue.put({"error": f"{type(e).__name__}: {e}"})


def run_row(fn, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, queue))
    p.start()
    res = queue.get()
    p.join()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="fewer windows and images, no 1M gallery")
    ap.add_argument("--smoke", action="store_true", help="--quick with each row timed once at batch 8 on CPU and "
                    "a 10k gallery only: that the rows run, not their speed")
    ap.add_argument("--images", type=int, default=0, help="PNGs to make (default 256, 96 with --quick, 16 with --smoke)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--skip", nargs="*", default=[], help="rows to leave out: " + " ".join([*TRAIN_OPTIONS, "hnsw-1m"]))
    args = ap.parse_args()
    if args.smoke:
        global SMOKE
        SMOKE = args.quick = True
        os.environ["BENCH_SMOKE"] = "1"  # the rows run in spawned processes
    os.chdir(Path(__file__).resolve().parents[1])
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory() as tmp:
        n_img = args.images or (16 if args.smoke else 96 if args.quick else 256)
        make_pngs(Path(tmp), n_img)
        rows = {}
        for kind in ("tensors", "kit", "naive"):
            rows[f"train {kind}"] = run_row(row_train, kind, args.device, args.quick, tmp)
        for name, overrides in TRAIN_OPTIONS.items():
            if name in args.skip:
                continue
            rows[f"train kit {name}"] = run_row(row_train, "kit", args.device, args.quick, tmp, overrides)
        for kind in ("model", "kit", "kit merged"):
            rows[f"infer {kind}"] = run_row(row_infer, kind, args.device, args.quick, tmp)
        if "compile" not in args.skip:
            rows["infer kit compile"] = run_row(row_infer, "kit", args.device, args.quick, tmp, ["speed.compile=true"])
        sizes = [10_000] if args.smoke else [10_000, 100_000] + ([] if args.quick else [1_000_000])
        searches = ["matmul", "kit"] + (FAISS_ROWS if faiss_installed() else [])
        for n in sizes:
            for kind in searches:
                if kind == "faiss hnsw" and n > 100_000 and "hnsw-1m" in args.skip:
                    continue
                rows[f"retrieval {n:,} {kind}"] = run_row(row_retrieval, kind, args.device, args.quick, n)

    def ratio(a, b, key):
        try:
            if "ratio_alternated" in rows[a]:  # kit top-k: against the product timed beside it
                return rows[a]["ratio_alternated"]
            return rows[a][key] / rows[b][key]
        except (KeyError, ZeroDivisionError):
            return float("nan")

    ratios = {"train kit": ("train kit", "train tensors", "img/s", ">= 0.95"),
              "train naive": ("train naive", "train kit", "img/s", "(naive / kit)"),
              **{f"train kit {o}": (f"train kit {o}", "train kit", "img/s", "(/ kit)") for o in TRAIN_OPTIONS},
              "infer kit": ("infer kit", "infer model", "img/s", ""),
              "infer kit merged": ("infer kit merged", "infer kit", "img/s", "(merged / unmerged)"),
              "infer kit compile": ("infer kit compile", "infer kit", "img/s", "(/ kit)"),
              **{f"retrieval {n:,} kit": (f"retrieval {n:,} kit", f"retrieval {n:,} matmul", "ms/1k queries",
                                          "<= 1.25") for n in sizes},
              **{f"retrieval {n:,} {f}": (f"retrieval {n:,} {f}", f"retrieval {n:,} matmul", "ms/1k queries",
                                          "(/ matmul)") for n in sizes for f in FAISS_ROWS}}
    t = Table(title=f"entrep throughput, {args.device}, {platform.node()}, "
                    f"{time.strftime('%Y-%m-%d')}, torch {__import__('torch').__version__}")
    for col in ("row", "value", "ratio", "target", "peak RSS MiB", "notes"):
        t.add_column(col, justify="left" if col in ("row", "notes") else "right")
    for name, r in rows.items():
        if "error" in r:
            t.add_row(name, "failed", "", "", "", r["error"])
            continue
        key = "img/s" if "img/s" in r else "ms/1k queries"
        rt = ratios.get(name)
        notes = ", ".join(f"{k} {v:.3g}" for k, v in r.items() if k not in (key, "peak_rss_MiB"))
        t.add_row(name, f"{r[key]:,.1f} {key}", f"{ratio(*rt[:3]):.2f}" if rt else "", rt[3] if rt else "",
                  f"{r['peak_rss_MiB']:,.0f}", notes)
    t.caption = (f"faiss {__import__('faiss').__version__}" if faiss_installed() else "faiss not installed: no FAISS rows")
    Console(width=160).print(t)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
