"""Interrupted and repeated training: a killed run resumes to the same result, Ctrl-C says how to
resume, one writer per run directory, folds trained in separate calls are one run, the seed picks the folds."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TRAIN, py


def _sha(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(demo, trained_demo_run, tmp_path):
    """SIGKILL in the middle of fold 1; resume finishes it, fold 0 stays byte-identical, and the
    final report equals the uninterrupted run's (same config and seed: deterministic on CPU)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = [sys.executable, "train.py", *TRAIN, "--data", str(demo), "--name", "b", f"output_dir={tmp_path}",
            "train.epochs=1"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "b"
    deadline = time.time() + 300
    while not (run / "fold0/metrics.json").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before fold 0 finished"
        time.sleep(0.02)
    # fold 0 is complete, fold 1 has just begun (building its model alone takes longer than this poll)
    assert proc.poll() is None and not (run / "fold1/metrics.json").exists(), "fold 1 finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "fold1/metrics.json").exists() and not (run / "report.json").exists()
    fold0 = _sha(run / "fold0")
    out = py("train.py", *TRAIN, "--data", demo, "--name", "b", f"output_dir={tmp_path}", "train.resume=true")
    assert "fold 0: finished earlier, skipped" in out.stdout
    assert _sha(run / "fold0") == fold0
    assert (run / "folds.csv").read_bytes() == (trained_demo_run / "folds.csv").read_bytes()
    a, b = (json.loads((r / "report.json").read_text()) for r in (trained_demo_run, run))
    for key in ("classification", "i2i", "t2i", "folds"):
        assert a[key] == b[key], key


@pytest.mark.slow
def test_a_different_seed_gives_different_folds(demo, trained_demo_run, tmp_path):
    from entrep.data.folds import make_folds
    from entrep.data.release import load_release
    from entrep.labels import ENTREP_CLASSES

    df, _ = load_release(demo, ENTREP_CLASSES)
    import pandas as pd

    from entrep.data.folds import file_signatures

    saved = pd.read_csv(trained_demo_run / "folds.csv")
    sigs = file_signatures(df["path"].tolist())
    assert saved["fold"].tolist() == make_folds(df, 2, 42, sigs)["fold"].tolist()
    assert saved["fold"].tolist() != make_folds(df, 2, 7, sigs)["fold"].tolist()


def test_one_writer_per_run_directory_and_a_killed_holder_does_not_block(tmp_path):
    from entrep.errors import EntrepError
    from entrep.io import exclusive_run

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from entrep.io import exclusive_run\n"
        f"with exclusive_run(Path({str(tmp_path)!r}), 'train.py'):\n"
        "    print('held', flush=True); time.sleep(120)\n")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(EntrepError, match=r"is in use by another train\.py \(pid \d+ on .*\); wait for it, or use"):
        with exclusive_run(tmp_path, "train.py"):
            pass
    holder.send_signal(signal.SIGKILL)  # killed: no clean-up ran, the owner file is left behind
    holder.wait()
    with exclusive_run(tmp_path, "train.py"):
        assert json.loads((tmp_path / ".lock.owner").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock.owner").exists()


@pytest.mark.slow
def test_a_second_train_on_a_fold_being_trained_is_refused_in_one_line(demo, tmp_path):
    # epochs enough that the first call is still on fold 0 when the second has started up
    args = ["train.py", *TRAIN, "--data", demo, "--name", "same", f"output_dir={tmp_path}", "train.epochs=40"]
    first = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "same/.lock.fold0.owner").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        r = py(*args, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
        out = " ".join(r.stdout.split())
        assert f"fold 0 of {tmp_path / 'same'} is being trained by another train.py (pid {first.pid}" in out
        assert "train other folds (train.folds=[...]) or wait for it" in out
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_two_calls_on_disjoint_folds_of_one_run_train_at_once_and_leave_one_report(demo, tmp_path):
    """The Kaggle habit, one fold per GPU: `train.py --name R train.folds=[k]` per device. Each fold is held
    by its own call, the run-level files by one call at a time; the call that finishes the last fold
    writes the report."""
    calls = [subprocess.Popen([sys.executable, "train.py", *map(str, TRAIN), "--data", str(demo), "--name", "split",
                               f"output_dir={tmp_path}", f"train.folds=[{k}]"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=dict(os.environ, COLUMNS="200"))
             for k in (0, 1)]
    outs = [c.communicate(timeout=900)[0] for c in calls]
    assert [c.returncode for c in calls] == [0, 0], outs
    run = tmp_path / "split"
    assert all((run / f"fold{k}/metrics.json").is_file() for k in (0, 1)) and (run / "report.json").is_file()
    report = json.loads((run / "report.json").read_text())
    assert [f["fold"] for f in report["folds"]] == [0, 1]
    assert any("out-of-fold scores" in o for o in outs)  # printed by the call that finished the last fold
    assert not list(run.glob(".lock*.owner"))  # every hold released


@pytest.mark.slow
def test_ctrl_c_during_training_says_how_to_resume(demo, tmp_path):
    args = [sys.executable, "train.py", *TRAIN, "--data", str(demo), "--name", "int", f"output_dir={tmp_path}"]
    # as from a terminal: a runner that started pytest in the background (`cmd &` in a script) leaves SIGINT
    # ignored, every process below inherits that, and train.py rightly keeps it ignored
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (tmp_path / "int/folds.csv").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in out, out[-2000:]
    assert "add train.resume=true to the same train.py command" in " ".join(out.split())


@pytest.mark.slow
def test_folds_trained_in_two_calls_are_one_run_and_its_settings_are_fixed(demo, tmp_path):
    """train.folds=[0], then train.folds=[1] without --config (the run's own config): infer ensembles
    both; a run-defining change is refused in one line and config.yaml stays as first written."""
    common = ["--data", demo, "--name", "split", f"output_dir={tmp_path}"]
    py("train.py", *TRAIN, *common, "train.folds=[0]")
    config = (tmp_path / "split/config.yaml").read_bytes()
    assert not (tmp_path / "split/report.json").exists()
    py("train.py", *common, "train.folds=[1]")  # no --config: the run's config.yaml
    assert (tmp_path / "split/config.yaml").read_bytes() == config and (tmp_path / "split/report.json").is_file()
    out = py("infer.py", "--run", tmp_path / "split", "--data", demo / "test")
    assert json.loads((tmp_path / "split/predictions/meta.json").read_text())["folds"] == ["fold0", "fold1"]
    assert "ensembling fold0, fold1" in " ".join(out.stdout.split())
    r = py("train.py", *TRAIN, *common, "train.resume=true", "train.epochs=3", "model.lora.rank=4", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert "other values of model.lora.rank, train.epochs" in " ".join(r.stdout.split())
    assert (tmp_path / "split/config.yaml").read_bytes() == config
    r = py("train.py", "--name", "nothing-here", f"output_dir={tmp_path}", check=False)
    assert r.returncode == 2 and "--config is required for a new run" in r.stdout
