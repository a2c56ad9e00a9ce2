"""The recipe's switches together through the real entry points: train.py -> infer.py -> submit.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow

RECIPE = ["train.ema_decay=0.99", "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0", "train.layer_decay=0.8",
          "infer.wise_grid=[0.5,0.75,1.0]"]


def run(*args):
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200"))
    assert r.returncode == 0, f"{args}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def test_a_run_with_every_recipe_switch_trains_infers_and_submits_with_wise_tuned_cross_fitted(demo, tmp_path):
    run("train.py", "--config", "configs/demo.yaml", "--data", demo, "--name", "recipe", f"output_dir={tmp_path}",
        "cv.n_splits=2", "train.epochs=1", *RECIPE)
    run_dir = tmp_path / "recipe"
    cfg = (run_dir / "config.yaml").read_text()
    for line in ("ema_decay: 0.99", "mixup_alpha: 0.2", "cutmix_alpha: 1.0", "layer_decay: 0.8"):
        assert line in cfg, line
    tuned = json.loads((run_dir / "tuned.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    # the scale is chosen per part on all folds for infer.py, and per fold on the other folds for the report
    assert set(tuned["wise"]) == {"cls", "i2i", "t2i"} and all(s in (0.5, 0.75, 1.0) for s in tuned["wise"].values())
    assert all(set(f["settings"]["wise"]) == {"cls", "i2i", "t2i"} for f in report["folds"])
    for k in (0, 1):
        metrics = json.loads((run_dir / f"fold{k}" / "metrics.json").read_text())
        assert metrics["epochs"] and all(v == v for v in metrics["epochs"][-1].values() if isinstance(v, float))
    out = run("infer.py", "--run", run_dir, "--data", demo / "test")
    meta = json.loads((run_dir / "predictions" / "meta.json").read_text())
    assert meta["wise"] == tuned["wise"], out[-2000:]  # infer.py applies the scales tuned.json chose
    run("submit.py", "--run", run_dir)
    assert {p.name for p in (run_dir / "submission").iterdir()} >= {"cls.json", "i2i.json", "t2i.json", "cls.zip"}
