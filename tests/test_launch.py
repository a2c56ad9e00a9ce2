"""Launches users really run: real 2-process DDP on CPU (gloo) through `accelerate launch train.py`,
the refusal of a launch whose processes do not form one job, and the shipped ViT-B/16 recipe."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from entrep.data.release import load_release, read_query_lines
from entrep.labels import ENTREP_CLASSES

ROOT = Path(__file__).parents[1]
# one xdist worker runs every test here in turn (make test: --dist loadgroup): two 2-process launches at once
# on a 2-core machine would each wait for the other
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ddp")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, processes: int, use_cpu: bool = True, config="configs/demo.yaml"):
    """`[ACCELERATE_USE_CPU=true] accelerate launch [--multi_gpu --num_processes N] train.py ...`"""
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    env.pop("ACCELERATE_USE_CPU", None)
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    multi = ["--multi_gpu", "--main_process_port", str(free_port())] if processes > 1 else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train.py",
           "--config", config, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)


def run_ok(*args):
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, COLUMNS="200"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.parametrize("prompts", ["true", "false"])
def test_two_process_ddp_trains_infers_and_submits(prompts, demo, tmp_path):
    runs = tmp_path / "runs"
    r = launch("--data", demo, "--name", "ddp", f"output_dir={runs}", "cv.n_splits=2", "train.epochs=2",
               "train.batch_size=8", f"model.prompts={prompts}", processes=2)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    run_dir = runs / "ddp"
    assert "accelerate: 2 process(es), DistributedType.MULTI_CPU" in log
    for k in (0, 1):
        meta = json.loads((run_dir / f"fold{k}/meta.json").read_text())
        assert meta["written_by"] == {"process_index": 0, "num_processes": 2, "distributed_type": "MULTI_CPU"}
        assert log.count(f"fold {k}: saved to ") == 1  # once, by the main process
        history = pd.read_csv(run_dir / f"fold{k}/history.csv")
        assert len(history) == 2 and history["loss"].notna().all()  # real steps, not empty epochs
        assert not list((run_dir / f"fold{k}").glob(".*"))  # no temp file or folder left behind
    df, _ = load_release(demo, ENTREP_CLASSES)
    oof = pd.read_csv(run_dir / "oof.csv")
    assert sorted(oof["image"]) == sorted(df.loc[df["y"] >= 0, "image"])  # exactly the labelled images, once each
    report = json.loads((run_dir / "report.json").read_text())
    assert report["i2i"]["n_queries"] > 0 and report["t2i"]["n_queries"] > 0

    run_ok("infer.py", "--run", run_dir, "--data", demo / "test")
    run_ok("submit.py", "--run", run_dir)
    for track in ("cls", "i2i", "t2i"):
        sub = json.loads((run_dir / f"submission/{track}.json").read_text())
        assert list(sub) == read_query_lines(demo / f"test/{track}.csv")


def test_a_launch_whose_processes_do_not_form_one_job_is_refused(demo, tmp_path):
    """`--multi_gpu --num_processes 2` without a GPU (and without ACCELERATE_USE_CPU) starts two
    processes that each see a world of 1: both would train every fold and write the same files."""
    runs = tmp_path / "runs"
    r = launch("--data", demo, "--name", "dup", f"output_dir={runs}", "cv.n_splits=2", "train.epochs=1",
               processes=2, use_cpu=False)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "error: the launcher started 2 processes but Accelerate sees 1" in out
    assert "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2" in out
    assert "Traceback (most recent call last):\n  File \"" + str(ROOT) not in out  # our side: one line, no traceback
    assert not (runs / "dup/fold0").exists()


def test_shipped_vitb16_recipe_trains_two_folds_under_accelerate_launch(tmp_path):
    """configs/entrep_vitb16.yaml as shipped, random weights, on a release small enough for CPU:
    only the weights, the data size (images, folds) and the epochs differ from what users launch."""
    from entrep.data.synthetic import make_demo

    data = make_demo(tmp_path / "data", seed=1, size=64, cases=42, test_cases=8, public_cases=0)
    runs = tmp_path / "runs"
    r = launch("--data", data, "--name", "vitb16", f"output_dir={runs}", "model.pretrained=", "cv.n_splits=2",
               "train.epochs=1", processes=1, config="configs/entrep_vitb16.yaml")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    run_dir = runs / "vitb16"
    assert json.loads((run_dir / "fold0/meta.json").read_text())["model_name"] == "ViT-B-16-quickgelu"
    report = json.loads((run_dir / "report.json").read_text())
    assert len(report["folds"]) == 2 and 0 <= report["classification"]["f1_macro"] <= 1
    run_ok("infer.py", "--run", run_dir, "--data", data / "test")
    run_ok("submit.py", "--run", run_dir)
    assert (run_dir / "submission/cls.zip").is_file()


@pytest.mark.parametrize("mode", ["folds", "auto"])
def test_parallel_folds_train_each_fold_in_its_own_process_and_report_as_one_process_would(mode, demo, tmp_path,
                                                                                          monkeypatch):
    """train.parallel=folds (or auto, 2 processes for 2 folds): each process trains its folds alone, no
    gradient sync, and the launch leaves one report whose figures are the sequential run's (one thread
    each, deterministic on CPU)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    common = ["--data", demo, "--name", "r", "cv.n_splits=2", "train.epochs=1"]
    r = launch(*common, f"output_dir={tmp_path / 'par'}", f"train.parallel={mode}", processes=2)
    log = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 0, log[-6000:]
    assert "DistributedType.MULTI_CPU" not in log and log.count("accelerate: 1 process(es), DistributedType.NO") == 2
    assert "process 0 of 2: folds [0]" in log and "process 1 of 2: folds [1]" in log
    assert f"train.parallel={mode}: process 1 of 2 trains whole folds alone" in log
    assert log.count("out-of-fold scores") == 1  # the process that finished the last fold wrote the report
    run_ok("train.py", "--config", "configs/demo.yaml", *common, f"output_dir={tmp_path / 'seq'}")
    par, seq = (json.loads((tmp_path / d / "r/report.json").read_text()) for d in ("par", "seq"))
    for key in ("classification", "i2i", "t2i", "t2i_pairs", "t2i_any", "folds", "grouping"):
        assert par[key] == seq[key], key
    run = json.loads((tmp_path / "par/r/run.json").read_text())
    assert run["batch"]["processes"] == 1  # the effective batch of one process: the sequential run's


def test_parallel_auto_with_more_processes_than_folds_is_ddp(demo, tmp_path):
    r = launch("--data", demo, "--name", "r", f"output_dir={tmp_path}", "cv.n_splits=2", "train.epochs=1",
               "train.folds=[0]", "train.parallel=auto", "train.batch_size=8", processes=2)
    log = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 0, log[-6000:]
    assert "train.parallel=auto: DDP over 2 processes (more processes than the 1 folds to train)" in log
    assert "accelerate: 2 process(es), DistributedType.MULTI_CPU" in log
