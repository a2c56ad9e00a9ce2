"""What train.py, infer.py, submit.py and entrep.blend say, in one line, when asked for what they cannot
do; the trackers; and the library calls (entrep.predict, entrep.train_fold) against the scripts. Refusals
run in-process through run_main; a subprocess only where the launch itself is under test."""

import importlib.util
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import TRAIN, ok, one_line, py
from entrep.commands.blend import main as blend_main
from entrep.commands.infer import main as infer
from entrep.commands.submit import main as submit
from entrep.commands.train import main as train


@pytest.mark.slow
def test_infer_refuses_or_uses_unfinished_folds(demo, trained_demo_run, tmp_path, capsys):
    run = tmp_path / "partial"
    shutil.copytree(trained_demo_run, run)
    (run / "fold1/metrics.json").unlink()
    line = one_line(capsys, infer, ["--run", run, "--data", demo / "test"])
    assert "folds ['fold1'] are unfinished" in line and "infer.partial=use" in line
    assert "ensembling 1 finished folds only" in ok(capsys, infer, ["--run", run, "--data", demo / "test",
                                                                    "infer.partial=use"])
    assert json.loads((run / "predictions/meta.json").read_text())["folds"] == ["fold0"]


@pytest.mark.slow
def test_adapters_on_another_base_are_refused(trained_demo_run, demo, tmp_path, capsys):
    line = one_line(capsys, infer, ["--run", trained_demo_run, "--data", demo / "test", "model.name=ViT-B-32"])
    assert "model.name defines the run" in line  # an override never reaches the folds
    run = tmp_path / "edited"
    shutil.copytree(trained_demo_run, run)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("name: entrep-tiny", "name: ViT-B-32", 1))  # a hand edit
    assert "trained on base 'entrep-tiny'" in one_line(capsys, infer, ["--run", run, "--data", demo / "test"])


@pytest.mark.slow
def test_query_image_missing_from_test_folder(trained_demo_run, demo, tmp_path, capsys):
    test = tmp_path / "test"
    shutil.copytree(demo / "test", test)
    with open(test / "i2i.csv", "a") as f:
        f.write("not-there.png\n")
    line = one_line(capsys, infer, ["--run", trained_demo_run, "--data", test])
    assert "query image 'not-there.png' is not in the test folder" in line


@pytest.mark.slow
def test_infer_on_a_folder_without_queries_leaves_the_predictions_alone(trained_demo_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_demo_run, run)
    (tmp_path / "noq").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "noq/x.png")
    assert "no query list" in one_line(capsys, infer, ["--run", run, "--data", tmp_path / "noq"])
    assert not (run / "predictions").exists()


@pytest.mark.slow
def test_infer_says_when_test_images_are_training_images(trained_demo_run, demo, tmp_path, capsys):
    """The release root as the test folder puts every training image in the gallery: say so, say
    which gallery is used, and record it for submit.py."""
    run = tmp_path / "run"
    shutil.copytree(trained_demo_run, run)
    out = ok(capsys, infer, ["--run", run, "--data", demo])
    assert "test images are training images (by name:" in out and "gallery: every image of" in out
    leak = json.loads((run / "predictions/meta.json").read_text())["test_images_in_training"]
    import pandas as pd

    folds = set(pd.read_csv(run / "folds.csv")["image"])
    assert leak["by_name"] and set(leak["by_name"]) <= folds and leak["by_content"]
    assert "gallery images are also training images" in ok(capsys, submit, ["--run", run])
    clean = tmp_path / "clean"
    shutil.copytree(trained_demo_run, clean)
    assert "training images" not in ok(capsys, infer, ["--run", clean, "--data", demo / "test"])


def test_submit_without_predictions_says_what_to_run(tmp_path, capsys):
    assert "run infer.py" in one_line(capsys, submit, ["--run", tmp_path])


def test_an_unwritable_folder_is_one_line(capsys):
    """CI runs as root, which writes anywhere, so the entry points' handler is exercised directly."""
    from entrep.cli import run_main

    def main(argv=None):
        raise PermissionError(13, "Permission denied", "/ro/runs/x")

    assert run_main(main) == 2
    out = capsys.readouterr().out
    assert "cannot write /ro/runs/x: Permission denied" in out and "Traceback" not in out


@pytest.mark.slow
def test_blend_refuses_what_cannot_be_blended_in_one_line(trained_demo_run, tmp_path, capsys):
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
        return one_line(capsys, blend_main, args)

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
    ok(capsys, blend_main, ["--runs", runs / "a", runs / "a2", "--name", "ok", "--rounds", "2"])
    assert "is a blend; blend its member runs" in blend("--runs", runs / "ok", runs / "a", "--name", "z")
    assert "is a blend of ['../a', '../a2']" in blend("--runs", runs / "a", runs / "a3", "--name", "ok")


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
def test_config_errors_through_the_entry_point(demo, tmp_path, capsys):
    line = one_line(capsys, train, [*TRAIN, "--data", demo, "train.epoch=2"])
    assert "unknown config key 'train.epoch'; did you mean 'train.epochs'?" in line
    assert "'train.epochs': expected int" in one_line(capsys, train, [*TRAIN, "--data", demo, "train.epochs=two"])
    line = one_line(capsys, train, [*TRAIN, "--data", demo, "--name", "tb2", f"output_dir={tmp_path}",
                                    "train.log_with=[wandbx]"])
    assert "config key 'train.log_with' = 'wandbx'; choose one of" in line
    # more folds than groups: found once the release is read, inside a real launch of train.py
    r = py("train.py", *TRAIN, "--data", demo, f"output_dir={tmp_path}", "cv.n_splits=40", check=False)
    assert r.returncode == 2 and "cv.n_splits=40" in r.stdout and "lower cv.n_splits" in r.stdout


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
    if importlib.util.find_spec("dvclive") is None:  # a known tracker whose package is missing: not a silent drop
        r = py("train.py", *TRAIN, "--data", demo, "--name", "tb3", f"output_dir={tmp_path}",
               "train.log_with=[dvclive]", check=False)
        assert r.returncode == 2 and "the package is not installed (pip install dvclive)" in " ".join(r.stdout.split())


@pytest.mark.slow
def test_entrep_predict_is_a_library_call_that_matches_infer_py(trained_demo_run, demo, tmp_path, capsys):
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
    ok(capsys, infer, ["--run", run, "--data", demo / "test", "infer.topk=3"])
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
    # resume on the finished fold: one line saying nothing was trained (was a ValueError from unpacking)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with pytest.raises(entrep.config.ConfigError, match="fold 1 of .* finished earlier and train.resume=true "
                                                            "skips it; nothing was trained"):
            entrep.train_fold(run, 1, train__resume=True)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_rankings_of_the_classification_track_say_where_it_is():
    from entrep.inference import Predictions

    preds = Predictions(pd.DataFrame(), {"q": [{"image": "a", "score": 1.0}]}, {}, {})
    assert list(preds.rankings("i2i")["image"]) == ["a"]
    with pytest.raises(ValueError, match=r"the classification track is preds.classes"):
        preds.rankings("cls")


@pytest.mark.parametrize("k", [0.5, "1", True, None, float("nan")])
def test_train_fold_refuses_a_fold_number_that_is_not_one_before_any_work(tmp_path, k):
    import entrep
    from entrep.config import ConfigError

    with pytest.raises(ConfigError, match="is not a fold number"):
        entrep.train_fold(tmp_path / "r", k)
    assert not (tmp_path / "r").exists()
