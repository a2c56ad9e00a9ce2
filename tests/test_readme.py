"""`make demo` as the README gives it (data -> two runs under `accelerate launch` -> their blend ->
infer, submit and score for each), shrunk through its DEMO_GEN / DEMO_TRAIN variables and run
with this interpreter's environment."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_runs_end_to_end(tmp_path):
    venv = Path(sys.prefix)
    data, runs = tmp_path / "data", tmp_path / "runs"
    r = subprocess.run(["make", "demo", f"VENV={venv}", "-o", f"{venv}/.installed", f"DEMO_DATA={data}",
                        f"RUNS={runs}", "DEMO_GEN=--size 64 --cases 60 --test-cases 16",
                        "DEMO_TRAIN=cv.n_splits=2 train.epochs=1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200,
                       env=dict(os.environ, COLUMNS="200", PYTHONUNBUFFERED="1"))
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    assert "out-of-fold scores: members and blend" in log
    report = json.loads((runs / "demo_blend/report.json").read_text())
    assert set(report["members"]) == {str(runs / "demo"), str(runs / "demo_seed1")}
    for run in ("demo", "demo_seed1", "demo_blend"):
        for track in ("cls", "i2i", "t2i"):
            assert (runs / run / "submission" / f"{track}.zip").is_file(), (run, track)
    assert log.count("accuracy") >= 3 and log.count("mrr") >= 6  # every run and the blend scored on every track
    from browser import open_page

    for run in ("demo", "demo_seed1", "demo_blend"):  # each report's page, as a browser shows it
        seen = open_page(runs / run / "report.html")
        assert seen["problems"] == [] and seen["broken"] == 0 and seen["images"] > 20, (run, seen["problems"])
        assert "Worst-classified images" in seen["text"] and "Worst i2i queries" in seen["text"]
    assert "Members" in open_page(runs / "demo_blend/report.html")["text"]
    table = log.split("runs under", 1)[1]  # python -m entrep.runs: the three, with their fold spreads
    assert all(f"{run} " in table for run in ("demo", "demo_seed1", "demo_blend")) and table.count("±") >= 12
