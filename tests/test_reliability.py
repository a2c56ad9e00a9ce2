"""Bad input through the real entry points, interrupted runs and writes, determinism, safe loading."""
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from entrep.data.images import ImageDecodeError, decode_image
from entrep.io import atomic_write_json

ROOT = Path(__file__).parents[1]
TRAIN = ["--config", "configs/demo.yaml", "cv.n_splits=2", "train.epochs=1"]


def py(*args, timeout=600, check=True):
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check:
        assert r.returncode == 0, f"{args}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


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


@pytest.mark.slow
def test_infer_refuses_or_uses_unfinished_folds(demo, trained_demo_run, tmp_path):
    run = tmp_path / "partial"
    shutil.copytree(trained_demo_run, run)
    (run / "fold1/metrics.json").unlink()
    r = py("infer.py", "--run", run, "--data", demo / "test", check=False)
    assert r.returncode == 2
    assert "folds ['fold1'] are unfinished" in r.stdout and "infer.partial=use" in r.stdout
    r = py("infer.py", "--run", run, "--data", demo / "test", "infer.partial=use")
    assert "ensembling 1 finished folds only" in r.stdout
    assert json.loads((run / "predictions/meta.json").read_text())["folds"] == ["fold0"]


@pytest.mark.slow
def test_adapters_on_another_base_are_refused(trained_demo_run, demo, tmp_path):
    r = py("infer.py", "--run", trained_demo_run, "--data", demo / "test", "model.name=ViT-B-32", check=False)
    assert r.returncode == 2 and "model.name defines the run" in r.stdout  # an override never reaches the folds
    run = tmp_path / "edited"
    shutil.copytree(trained_demo_run, run)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("name: entrep-tiny", "name: ViT-B-32", 1))  # a hand edit
    r = py("infer.py", "--run", run, "--data", demo / "test", check=False)
    assert r.returncode == 2 and "trained on base 'entrep-tiny'" in r.stdout


@pytest.mark.slow
def test_query_image_missing_from_test_folder(trained_demo_run, demo, tmp_path):
    test = tmp_path / "test"
    shutil.copytree(demo / "test", test)
    with open(test / "i2i.csv", "a") as f:
        f.write("not-there.png\n")
    r = py("infer.py", "--run", trained_demo_run, "--data", test, check=False)
    assert r.returncode == 2 and "query image 'not-there.png' is not in the test folder" in r.stdout


@pytest.mark.slow
def test_corrupt_training_images_are_counted_skips_or_an_error(demo, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo, data)
    imgs = sorted((data / "train/imgs").iterdir())
    imgs[0].write_bytes(b"")
    imgs[1].write_bytes(imgs[1].read_bytes()[:200])
    r = py("train.py", *TRAIN, "--data", data, "--name", "c", f"output_dir={tmp_path}", "train.folds=[0]")
    assert "skipped 2 unreadable images" in r.stdout and imgs[0].name in r.stdout
    r = py("train.py", *TRAIN, "--data", data, "--name", "d", f"output_dir={tmp_path}", "data.bad_images=error",
           check=False)
    assert r.returncode == 2 and "2 unreadable images" in r.stdout and "data.bad_images=skip" in r.stdout


@pytest.mark.slow
def test_config_errors_through_the_entry_point(demo, tmp_path):
    r = py("train.py", *TRAIN, "--data", demo, "train.epoch=2", check=False)
    assert r.returncode == 2 and "unknown config key 'train.epoch'; did you mean 'train.epochs'?" in r.stdout
    r = py("train.py", *TRAIN, "--data", demo, "train.epochs=two", check=False)
    assert r.returncode == 2 and "'train.epochs': expected int" in r.stdout
    r = py("train.py", *TRAIN, "--data", demo, f"output_dir={tmp_path}", "cv.n_splits=40", check=False)
    assert r.returncode == 2 and "cv.n_splits=40" in r.stdout and "lower cv.n_splits" in r.stdout


def test_submit_without_predictions_says_what_to_run(tmp_path):
    r = py("submit.py", "--run", tmp_path, check=False)
    assert r.returncode == 2 and "run infer.py" in r.stdout


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    atomic_write_json(path, {"old": 1})

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left behind


def test_unserialisable_payload_never_truncates(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P"])
def test_valid_odd_images_are_converted(tmp_path, mode):
    arr = np.random.default_rng(0).integers(0, 255, (20, 30), dtype=np.uint8)
    if mode == "I;16":
        im = Image.fromarray(arr.astype(np.uint16) * 257)
    elif mode == "RGBA":
        im = Image.fromarray(np.dstack([arr] * 4))
    else:
        im = Image.fromarray(arr).convert(mode)
    im.save(tmp_path / "x.png")
    out = decode_image(tmp_path / "x.png", 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8 and out.max() > 100


def test_bad_image_error_names_the_file(tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(ImageDecodeError, match=r"x\.png: cannot decode image"):
        decode_image(tmp_path / "x.png", 16)


def test_run_dir_arrays_and_weights_are_never_unpickled(tmp_path):
    from entrep.model.checkpoint import CheckpointError, load_fold_weights
    from entrep.oof import load_fold_oof

    with open(tmp_path / "oof.npz", "wb") as f:
        np.savez(f, head=np.array([object()], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle=False"):
        load_fold_oof(tmp_path / "oof.npz")
    import pickle

    (tmp_path / "kit.safetensors").write_bytes(pickle.dumps({"head.weight": [1.0]}))
    loaded = []
    model = SimpleNamespace(load_kit_state_dict=loaded.append, eval=lambda: None)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_fold_weights(model, tmp_path, "fold0")  # a pickle is not safetensors: refused before reading
    assert loaded == []


def test_atomic_writes_get_normal_permissions(tmp_path):
    atomic_write_json(tmp_path / "r.json", {})
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~umask
    from safetensors.torch import save_file

    from entrep.io import atomic_path

    with atomic_path(tmp_path / "kit.safetensors") as tmp:  # as save_weights writes kit.safetensors
        import torch

        save_file({"x": torch.zeros(2)}, str(tmp))
    assert (tmp_path / "kit.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


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
def test_a_second_train_on_the_same_run_is_refused_in_one_line(demo, tmp_path):
    args = ["train.py", *TRAIN, "--data", demo, "--name", "same", f"output_dir={tmp_path}"]
    first = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "same/.lock.owner").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        r = py(*args, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
        assert f"{tmp_path / 'same'} is in use by another train.py (pid {first.pid}" in " ".join(r.stdout.split())
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_infer_says_when_test_images_are_training_images(trained_demo_run, demo, tmp_path):
    """The release root as the test folder puts every training image in the gallery: say so, say
    which gallery is used, and record it for submit.py."""
    run = tmp_path / "run"
    shutil.copytree(trained_demo_run, run)
    r = py("infer.py", "--run", run, "--data", demo)
    out = " ".join((r.stdout + r.stderr).split())
    assert "test images are training images (by name:" in out and "gallery: every image of" in out
    leak = json.loads((run / "predictions/meta.json").read_text())["test_images_in_training"]
    import pandas as pd

    folds = set(pd.read_csv(run / "folds.csv")["image"])
    assert leak["by_name"] and set(leak["by_name"]) <= folds and leak["by_content"]
    sub = py("submit.py", "--run", run)
    assert "gallery images are also training images" in " ".join(sub.stdout.split())
    clean = tmp_path / "clean"
    shutil.copytree(trained_demo_run, clean)
    out = py("infer.py", "--run", clean, "--data", demo / "test")
    assert "training images" not in out.stdout + out.stderr


@pytest.mark.slow
def test_ctrl_c_during_training_says_how_to_resume(demo, tmp_path):
    args = [sys.executable, "train.py", *TRAIN, "--data", str(demo), "--name", "int", f"output_dir={tmp_path}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200"))
    deadline = time.time() + 120
    while not (tmp_path / "int/folds.csv").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in out, out[-2000:]
    assert "add train.resume=true to the same train.py command" in " ".join(out.split())


@pytest.mark.slow
def test_infer_on_a_folder_without_queries_leaves_the_predictions_alone(trained_demo_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_demo_run, run)
    (tmp_path / "noq").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "noq/x.png")
    r = py("infer.py", "--run", run, "--data", tmp_path / "noq", check=False)
    assert r.returncode == 2 and "no query list" in " ".join(r.stdout.split())
    assert not (run / "predictions").exists()


def test_an_unwritable_folder_is_one_line(capsys):
    """CI runs as root, which writes anywhere, so the entry points' handler is exercised directly."""
    from entrep.cli import run_main

    def main(argv=None):
        raise PermissionError(13, "Permission denied", "/ro/runs/x")

    assert run_main(main) == 2
    out = capsys.readouterr().out
    assert "cannot write /ro/runs/x: Permission denied" in out and "Traceback" not in out


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


@pytest.mark.slow
def test_entrep_predict_is_a_library_call_that_matches_infer_py(trained_demo_run, demo, tmp_path):
    """No subprocess, no file: class probabilities and rankings as data, the same as infer.py writes."""
    import pandas as pd

    import entrep
    from entrep.data.release import read_query_lines

    run = tmp_path / "run"
    shutil.copytree(trained_demo_run, run)
    preds = entrep.predict(run, demo / "test", infer__topk=3)
    assert not (run / "predictions").exists()
    probs = preds.classes.filter(like="p_")
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and (preds.classes["pred"] == probs.idxmax(1).str[2:]).all()
    assert list(preds.i2i) == read_query_lines(demo / "test/i2i.csv")
    assert all(len(r) == 3 for r in preds.t2i.values()) and preds.meta["topk"] == 3
    long = preds.rankings("i2i")
    assert list(long.columns) == ["query", "rank", "image", "score"] and long["rank"].max() == 3
    py("infer.py", "--run", run, "--data", demo / "test", "infer.topk=3")
    written = pd.read_csv(run / "predictions/classes.csv")
    assert written["pred"].tolist() == preds.classes["pred"].tolist()
    assert json.loads((run / "predictions/i2i.json").read_text()) == preds.i2i


@pytest.mark.slow
def test_entrep_train_fold_trains_a_fold_as_train_py_does(trained_demo_run, tmp_path):
    """The README's library call: fold 1 retrained in this process equals the one `python train.py` trained
    (same config, folds and seed: deterministic on CPU), and completing the run's last fold writes the report."""
    from accelerate.state import AcceleratorState

    import entrep

    run = tmp_path / "runs" / "a"
    shutil.copytree(trained_demo_run, run)
    shutil.rmtree(run / "fold1")
    for name in ("report.json", "tuned.json", "oof.csv"):
        (run / name).unlink()
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        result = entrep.train_fold(run, 1)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert result.fold == 1 and result.dir == run / "fold1" and (run / "fold1/metrics.json").is_file()
    assert result.oof is not None and len(result.history) == 1
    a, b = (json.loads((r / "report.json").read_text()) for r in (trained_demo_run, run))
    for key in ("classification", "i2i", "t2i", "folds"):
        assert a[key] == b[key], key


@pytest.mark.slow
def test_tensorboard_tracker_writes_per_epoch_losses_and_held_out_scores(demo, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    py("train.py", *TRAIN, "--data", demo, "--name", "tb", f"output_dir={tmp_path}", "train.epochs=2",
       "train.log_with=[tensorboard]")
    events = list((tmp_path / "tb/logs").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"fold0/loss", "fold1/loss", "fold0/val_f1_macro", "fold0/img_per_s", "oof/f1_macro"} <= tags, tags
    r = py("train.py", *TRAIN, "--data", demo, "--name", "tb2", f"output_dir={tmp_path}", "train.log_with=[wandbx]",
           check=False)
    assert r.returncode == 2 and "config key 'train.log_with' = 'wandbx'; choose one of" in r.stdout
    if importlib.util.find_spec("dvclive") is None:  # a known tracker whose package is missing: not a silent drop
        r = py("train.py", *TRAIN, "--data", demo, "--name", "tb3", f"output_dir={tmp_path}",
               "train.log_with=[dvclive]", check=False)
        assert r.returncode == 2 and "the package is not installed (pip install dvclive)" in " ".join(r.stdout.split())


@pytest.mark.slow
def test_blend_refuses_what_cannot_be_blended_in_one_line(trained_demo_run, tmp_path):
    import pandas as pd

    runs = tmp_path / "runs"
    for name in ("a", "b", "partial"):
        shutil.copytree(trained_demo_run, runs / name)
    folds = pd.read_csv(runs / "b/folds.csv", keep_default_na=False)
    first = folds["image"].iloc[0]
    folds.loc[0, "fold"] = 1 - folds.loc[0, "fold"]
    folds.to_csv(runs / "b/folds.csv", index=False)
    (runs / "partial/fold1/oof.npz").unlink()

    def blend(*args):
        r = py("-m", "entrep.blend", *args, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
        return " ".join(r.stdout.split())

    assert f"first difference {first}" in blend("--runs", runs / "a", runs / "b", "--name", "ab")
    assert "cv.folds_from" in blend("--runs", runs / "a", runs / "b", "--name", "ab")
    assert "no complete OOF report (missing ['fold1'])" in blend("--runs", runs / "a", runs / "partial", "--name", "x")
    assert "listed twice" in blend("--runs", runs / "a", runs / "a", "--name", "aa")
    assert "at least two runs" in blend("--runs", runs / "a", "--name", "one")
    assert "is a training run" in blend("--runs", runs / "a", runs / "partial", "--name", "b")
    assert not (runs / "ab").exists() and not (runs / "aa").exists()  # refused before anything is written
    assert "not a run directory" in blend("--runs", runs / "a", tmp_path / "nowhere", "--name", "y")
    # a finished blend is neither a member nor overwritten by a blend of other runs
    for name in ("a2", "a3"):
        shutil.copytree(trained_demo_run, runs / name)
    py("-m", "entrep.blend", "--runs", runs / "a", runs / "a2", "--name", "ok", "--rounds", "2")
    assert "is a blend; blend its member runs" in blend("--runs", runs / "ok", runs / "a", "--name", "z")
    assert "is a blend of ['../a', '../a2']" in blend("--runs", runs / "a", runs / "a3", "--name", "ok")
