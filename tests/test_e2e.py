"""The real entry points: `accelerate launch train.py`, then infer.py and submit.py, in subprocesses."""
import importlib.util
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from conftest import REAL, placeholder
from entrep.data.release import load_release, read_query_lines
from entrep.labels import ENTREP_CLASSES

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def accel_config(tmp_path_factory):
    from accelerate.utils import write_basic_config

    path = tmp_path_factory.mktemp("accelerate") / "default_config.yaml"
    write_basic_config(mixed_precision="no", save_location=str(path))
    return path


def run(*args, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    r = subprocess.run([*map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{args}\nSTDOUT:\n{r.stdout[-4000:]}\nSTDERR:\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


def launch(accel_config, *args):
    return run(sys.executable, "-m", "accelerate.commands.launch", "--config_file", accel_config, "train.py",
               "--config", "configs/demo.yaml", *args)


def _hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_infer_submit_on_demo(demo, accel_config, tmp_path):
    runs = tmp_path / "runs"
    common = ["--data", demo, "--name", "e2e", f"output_dir={runs}", "cv.n_splits=2", "train.epochs=1"]
    launch(accel_config, *common)
    run_dir = runs / "e2e"
    for f in ("config.yaml", "folds.csv", "oof.csv", "report.json", "tuned.json", "confusion_matrix.png",
              "per_class_f1.png"):
        assert (run_dir / f).is_file(), f
    for k in (0, 1):
        for f in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "kit.safetensors",
                  "meta.json", "metrics.json", "history.csv", "oof.npz"):
            assert (run_dir / f"fold{k}" / f).is_file(), f
    df, _ = load_release(demo, ENTREP_CLASSES)
    oof = pd.read_csv(run_dir / "oof.csv")
    assert len(oof) == int((df["y"] >= 0).sum()) and not oof["image"].duplicated().any()
    report = json.loads((run_dir / "report.json").read_text())
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted"):
        assert 0 <= report["classification"][key] <= 1
    for track in ("i2i", "t2i"):
        assert {"recall@1", "recall@5", "recall@10", "mrr", "relevance"} <= set(report[track])
        assert report[track]["n_queries"] > 0
    # t2i per caption beside every pair once and any carrier: one set of rankings, three rules
    assert report["t2i_pairs"]["n_queries"] == report["t2i"]["n_queries"] >= report["t2i"]["n_groups"]
    assert report["t2i_any"]["n_queries"] == report["t2i"]["n_groups"]
    g = report["grouping"]  # the grouping the folds were built from
    folds = pd.read_csv(run_dir / "folds.csv")
    sizes = folds["fold_group"].value_counts()
    assert g["images"] == len(folds) and g["largest_group"] == sizes.max() and g["groups"] == (sizes > 1).sum()
    assert g["groups_spanning_classes"] == 0 and g["largest_group"] <= g["cap"]
    assert len(report["folds"]) == 2

    run(sys.executable, "infer.py", "--run", run_dir, "--data", demo / "test")
    run(sys.executable, "submit.py", "--run", run_dir)
    run(sys.executable, "submit.py", "--run", run_dir, "--topk", "5", "--out", tmp_path / "top5")
    for track in ("cls", "i2i", "t2i"):
        sub = json.loads((run_dir / f"submission/{track}.json").read_text())
        assert list(sub) == read_query_lines(demo / f"test/{track}.csv")
        with zipfile.ZipFile(run_dir / f"submission/{track}.zip") as z:
            assert z.namelist() == [f"{track}.json"]
    assert all(isinstance(v, int) for v in json.loads((run_dir / "submission/cls.json").read_text()).values())
    top5 = json.loads((tmp_path / "top5/i2i.json").read_text())
    assert all(isinstance(v, list) and len(v) == 5 and q not in v for q, v in top5.items())
    out = run(sys.executable, "-m", "entrep.score", "--track", "i2i", "--submission", run_dir / "submission/i2i.json",
              "--truth", demo / "truth/track2_i2i.json", "--json")
    assert 0 <= json.loads(out.strip().splitlines()[-1])["mrr"] <= 1

    # resume skips finished folds and leaves them byte-identical
    before = {k: _hashes(run_dir / f"fold{k}") for k in (0, 1)}
    log = launch(accel_config, *common, "train.resume=true")
    assert log.count("finished earlier, skipped") == 2
    assert {k: _hashes(run_dir / f"fold{k}") for k in (0, 1)} == before


def test_real_annotations_give_a_track3_submission_keyed_by_the_real_captions(real_release, accel_config, tmp_path):
    """Also the step-side augmentation (what a GPU run uses) and, where faiss is installed, its exact search."""
    runs = tmp_path / "runs"
    launch(accel_config, "--data", real_release / "train", "--name", "real", f"output_dir={runs}",
           "cv.n_splits=2", "train.epochs=1", "train.batch_size=64", "train.eval_batch_size=256",
           "speed.augment_on=device")
    folds = pd.read_csv(runs / "real/folds.csv")
    assert len(folds) == 1359
    test = tmp_path / "PublicData/PublicTest"
    for i in range(20):
        placeholder(test / f"public_{i:02d}.png", 50_000 + i)
    (tmp_path / "PublicData/Track3_Public").mkdir(parents=True)
    (tmp_path / "PublicData/Track3_Public/t2i.csv").write_bytes((REAL / "public_test/t2i.csv").read_bytes())
    search = ["infer.search=faiss-flat"] if importlib.util.find_spec("faiss") else []
    run(sys.executable, "infer.py", "--run", runs / "real", "--data", tmp_path / "PublicData", *search)
    run(sys.executable, "submit.py", "--run", runs / "real")
    sub = json.loads((runs / "real/submission/t2i.json").read_text())
    assert list(sub) == read_query_lines(REAL / "public_test/t2i.csv")
    assert len(sub) == 71 and set(sub.values()) <= {f"public_{i:02d}.png" for i in range(20)}
    assert not (runs / "real/submission/cls.json").exists()  # no cls.csv in that test folder


def test_fold_minus_one_trains_on_everything_and_infers(demo, tmp_path):
    runs = tmp_path / "runs"
    out = run(sys.executable, "train.py", "--config", "configs/demo.yaml", "--data", demo, "--name", "full",
              f"output_dir={runs}", "train.folds=[-1]", "train.epochs=1")
    full = runs / "full/full"
    meta = json.loads((full / "meta.json").read_text())
    df, _ = load_release(demo, ENTREP_CLASSES)
    assert meta["n_train"] == len(df) and meta["n_val"] == 0
    assert not (runs / "full/report.json").exists() and "OOF report waits" not in out
    out = run(sys.executable, "infer.py", "--run", runs / "full", "--data", demo / "test")
    assert "no tuned.json" in out
    assert json.loads((runs / "full/predictions/meta.json").read_text())["folds"] == ["full"]


def test_two_runs_blend_then_infer_and_submit_like_a_run(demo, trained_demo_run, tmp_path):
    """Two runs with the same data and cv settings share folds without being told; their blend is
    scored out of fold beside them, and infer/submit treat the blend directory as a run."""
    import numpy as np

    import entrep

    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(trained_demo_run, runs / "a")  # conftest: train.py, demo config, 2 folds of 1 epoch
    common = ["--config", "configs/demo.yaml", "--data", demo, f"output_dir={runs}", "cv.n_splits=2",
              "train.epochs=1"]
    run(sys.executable, "train.py", *common, "--name", "b", "train.seed=3", "model.lora.rank=8")
    assert (runs / "a/folds.csv").read_bytes() == (runs / "b/folds.csv").read_bytes()
    out = run(sys.executable, "-m", "entrep.blend", "--runs", runs / "a", runs / "b", "--name", "ab", "--rounds", "6")
    assert "blend ab" in out
    blend = runs / "ab"
    report = json.loads((blend / "report.json").read_text())
    assert set(report["members"]) == {str(runs / "a"), str(runs / "b")}
    for fig in (report, *report["members"].values()):
        assert 0 <= fig["classification"]["f1_macro"] <= 1 and fig["i2i"]["n_queries"] > 0
    assert [r["fold"] for r in report["folds"]] == [0, 1] and "weights" in report["folds"][0]["settings"]
    assert json.loads((blend / "blend.json").read_text())["members"] == ["../a", "../b"]

    run(sys.executable, "infer.py", "--run", blend, "--data", demo / "test")
    run(sys.executable, "submit.py", "--run", blend)
    for track in ("cls", "i2i", "t2i"):
        assert list(json.loads((blend / f"submission/{track}.json").read_text())) == read_query_lines(
            demo / f"test/{track}.csv")
    meta = json.loads((blend / "predictions/meta.json").read_text())
    assert meta["folds"] == ["a/fold0", "a/fold1", "b/fold0", "b/fold1"]
    # members keep their own alpha; only the blend's re-ranking is applied (and recorded)
    assert all(set(m[t]) == {"alpha"} for m in meta["members"] for t in ("i2i", "t2i"))

    # the library call: the blend's probabilities are its members' own predictions mixed by the cls weights
    w = meta["weights"]["cls"]
    pa, pb, pab = (entrep.predict(r, demo / "test") for r in (runs / "a", runs / "b", blend))
    cols = [c for c in pab.classes if c.startswith("p_")]
    np.testing.assert_allclose(pab.classes[cols].to_numpy(),
                               w[0] * pa.classes[cols].to_numpy() + w[1] * pb.classes[cols].to_numpy(), atol=1e-5)
    assert pab.rankings("i2i")["query"].nunique() == len(read_query_lines(demo / "test/i2i.csv"))
