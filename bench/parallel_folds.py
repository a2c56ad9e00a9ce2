"""Folds in parallel: a k-fold demo run timed three ways, alternating, each process one thread.

    python bench/parallel_folds.py [--folds 4] [--epochs 3] [--repeats 2] [--processes 2]

- sequential: `python train.py` (one process trains every fold);
- folds: `accelerate launch --multi_gpu --num_processes N train.py train.parallel=folds` (each process
  trains whole folds alone, no gradient sync);
- ddp: the same launch with train.parallel=ddp (every fold over the N processes, gradients synced).

On CPU (ACCELERATE_USE_CPU=true, gloo), every process with OMP_NUM_THREADS=1. Prints each mode's wall
times and its ratio to sequential, and whether the folds run's report.json figures equal the
sequential run's. The demo data is made once (entrep.demo, 80 px).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("classification", "i2i", "t2i", "folds")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(mode: str, data: Path, out: Path, folds: int, epochs: int, processes: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", PYTHONUNBUFFERED="1")
    args = ["train.py", "--config", "configs/demo.yaml", "--data", str(data), "--name", "r", f"output_dir={out}",
            f"cv.n_splits={folds}", f"train.epochs={epochs}", "train.batch_size=16"]
    if mode == "sequential":
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--main_process_port", str(_port()),
               "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", *args, f"train.parallel={mode}"]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    return wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from entrep.data.synthetic import make_demo

    times: dict[str, list[float]] = {"sequential": [], "folds": [], "ddp": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_demo(Path(tmp) / "data")
        reports = {}
        for rep in range(args.repeats):
            for mode in times:  # alternating: a slow spell of the machine hits every mode alike
                out = Path(tmp) / f"{mode}{rep}"
                times[mode].append(run(mode, data, out, args.folds, args.epochs, args.processes))
                reports[mode] = json.loads((out / "r/report.json").read_text())
    seq = statistics.median(times["sequential"])
    print(f"{args.folds}-fold demo run, {args.epochs} epochs, {args.processes} processes for folds and ddp, one "
          f"thread each, {os.cpu_count()} CPUs; median of {args.repeats}, alternating\n")
    print("| mode | wall times (s) | median / sequential |")
    print("| --- | --- | ---: |")
    for mode, ts in times.items():
        print(f"| {mode} | {', '.join(f'{t:.1f}' for t in ts)} | {statistics.median(ts) / seq:.2f}x |")
    same = all(reports["folds"][k] == reports["sequential"][k] for k in FIGURES)
    print(f"\nfolds run's report.json figures equal the sequential run's: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
