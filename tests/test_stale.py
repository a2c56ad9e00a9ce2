"""Derived files that outlive their inputs (issue 31, class 2): predictions, blends and fold weights
record fingerprints of what they were made from, and every reader refuses a mismatch in one line with
the command that brings it up to date; a set written as one unit is read as one."""
import json
import shutil
from types import SimpleNamespace

import pandas as pd
import pytest

from conftest import one_line
from entrep.errors import EntrepError
from entrep.io import atomic_dir, changed_since, fingerprint, fingerprints, folder_snapshot
from test_submission import _predictions


@pytest.mark.parametrize("size", [10, 5 << 20, (64 << 20) + 10])
def test_a_fingerprint_changes_with_any_byte_a_reader_would_see(tmp_path, size):
    """Whole-file sha1 up to 64 MiB; above it the size and both ends (base weights): a changed head,
    tail or length is seen."""
    f = tmp_path / "w.bin"
    f.write_bytes(b"\0" * size)
    before = fingerprint(f)
    for where in (0, size - 1):
        data = bytearray(f.read_bytes())
        data[where] ^= 1
        f.write_bytes(bytes(data))
        assert fingerprint(f) != before
        data[where] ^= 1
        f.write_bytes(bytes(data))
        assert fingerprint(f) == before
    f.write_bytes(b"\0" * (size + 1))
    assert fingerprint(f) != before
    assert fingerprint(tmp_path / "gone") is None


def test_recorded_fingerprints_follow_a_moved_run_and_name_what_changed(tmp_path):
    run = tmp_path / "runs/a"
    run.mkdir(parents=True)
    (run / "tuned.json").write_text("{}")
    outside = tmp_path / "base.bin"
    outside.write_bytes(b"w")
    (tmp_path / "runs/b").mkdir()
    (tmp_path / "runs/b/tuned.json").write_text("{}")  # a blend's member, beside it in runs/
    rec = fingerprints(run, [run / "tuned.json", run / "missing.json", tmp_path / "runs/b/tuned.json", outside])
    assert set(rec) == {"tuned.json", "missing.json", "../b/tuned.json", str(outside)}
    shutil.move(tmp_path / "runs", tmp_path / "moved")
    assert changed_since(tmp_path / "moved/a", rec) == []
    (tmp_path / "moved/a/missing.json").write_text("{}")  # a file written since: the record said none
    outside.write_bytes(b"x")
    assert changed_since(tmp_path / "moved/a", rec) == ["missing.json", str(outside)]


def test_a_set_written_as_one_unit_is_read_as_one_while_a_writer_replaces_it(tmp_path):
    """submit.py reads predictions through a handle on the folder as it was: infer.py swapping a new set
    in between two reads gives the old set whole, never one file of each."""
    folder = tmp_path / "predictions"
    with atomic_dir(folder, {"a", "b"}) as tmp:
        (tmp / "a").write_text("old a")
        (tmp / "b").write_text("old b")
    with folder_snapshot(folder) as at:
        first = at("a").read_text()
        with atomic_dir(folder, {"a", "b"}) as tmp:  # the writer lands between the two reads
            (tmp / "a").write_text("new a")
            (tmp / "b").write_text("new b")
        second = at("b").read_text() if at("b").exists() else None
    assert (first, second) in {("old a", "old b"), ("old a", None)}
    assert (folder / "b").read_text() == "new b"
    with pytest.raises(EntrepError) as e, folder_snapshot(folder) as at:
        raise EntrepError(f"{at('x')}: missing")
    assert str(e.value) == f"{folder / 'x'}: missing"  # errors name the folder, not the handle
    with pytest.raises(FileNotFoundError) as e, folder_snapshot(folder) as at:
        at("gone.csv").read_text()
    assert e.value.filename == str(folder / "gone.csv")


def test_submit_refuses_predictions_whose_sources_changed_and_names_the_renewal(tmp_path, capsys):
    from entrep.commands.submit import main

    _predictions(tmp_path, {"i2i": ["q.png"]})
    (tmp_path / "config.yaml").write_text("name: r\n")
    (tmp_path / "tuned.json").write_text('{"head_weight": 0.5}')
    meta = json.loads((tmp_path / "predictions/meta.json").read_text())
    meta["made_from"] = {"run": str(tmp_path), "files": fingerprints(tmp_path, [tmp_path / "tuned.json"])}
    (tmp_path / "predictions/meta.json").write_text(json.dumps(meta))
    assert main(["--run", str(tmp_path)]) == 0
    (tmp_path / "tuned.json").write_text('{"head_weight": 0.7}')  # re-scored or re-blended since
    line = one_line(capsys, main, ["--run", tmp_path])
    assert "predictions is stale" in line and f"{tmp_path / 'tuned.json'}" in line
    assert f"python infer.py --run {tmp_path} --data TEST" in line
    (tmp_path / "tuned.json").unlink()
    assert "1 of the files it was made from are gone" in one_line(capsys, main, ["--run", tmp_path])
    (tmp_path / "config.yaml").unlink()  # the run is not where the predictions say, nor beside them
    assert "which is not there now; pass --run RUN" in one_line(capsys, main, ["--predictions", tmp_path / "predictions",
                                                                              "--out", tmp_path / "o"])


def test_check_compatible_refuses_a_fold_whose_base_weights_file_was_swapped(tmp_path):
    from entrep.config import load_config
    from entrep.model.checkpoint import CheckpointError, check_compatible

    base = tmp_path / "base.safetensors"
    base.write_bytes(b"weights v1")
    cfg = load_config(None, [f"model.pretrained={base}"])
    meta = {"model_name": cfg.model.name, "labels": list(cfg.labels.names), "base_fingerprint": fingerprint(base)}
    check_compatible(meta, cfg, tmp_path / "run/fold0")
    base.write_bytes(b"weights v2")
    with pytest.raises(CheckpointError, match=r"trained on the base weights .*base.safetensors as they were then"):
        check_compatible(meta, cfg, tmp_path / "run/fold0")
    check_compatible({k: v for k, v in meta.items() if k != "base_fingerprint"}, cfg, tmp_path / "run/fold0")


def test_pseudo_labels_from_a_run_with_another_label_order_are_refused(tmp_path):
    from entrep.config import load_config, save_config
    from entrep.labels import LabelSet
    from entrep.training import pseudo_labels

    ours = load_config(None, [f"train.pseudo_from={tmp_path / 'src'}", f"train.pseudo_data={tmp_path}"])
    names = list(ours.labels.names)
    theirs = load_config(None, [f"labels.names=[{', '.join([names[1], names[0], *names[2:]])}]"])
    src = tmp_path / "src"
    (src / "fold0").mkdir(parents=True)
    save_config(theirs, src / "config.yaml")
    folds = pd.DataFrame({"image": ["a.png"], "label": [names[0]], "group": [0], "fold_group": [0], "fold": [0],
                          "sha1": ["0" * 40]})
    folds.to_csv(src / "folds.csv", index=False)
    (src / "fold0/metrics.json").write_text("{}")
    data = SimpleNamespace(folds=folds, labels=LabelSet.from_config(ours.labels))
    with pytest.raises(EntrepError, match="would label this run's images as other classes"):
        pseudo_labels(ours, None, data, 0)


@pytest.mark.slow
def test_infer_then_a_rescore_a_retrained_fold_or_a_changed_member_make_earlier_outputs_stale(
        trained_demo_run, demo, tmp_path, capsys):
    """The real chain: infer -> submit works; a re-tuned tuned.json or a retrained fold's weights make
    the predictions stale for submit; a member changed under a blend makes the blend refuse."""
    from entrep.ensemble import BlendError, read_blend
    from entrep.commands.blend import main as blend_main
    from entrep.commands.infer import main as infer_main
    from entrep.commands.submit import main as submit_main

    run = tmp_path / "runs/a"
    shutil.copytree(trained_demo_run, run, ignore=shutil.ignore_patterns(".lock*", "predictions", "submission"))
    assert infer_main(["--run", str(run), "--data", str(demo / "test")]) == 0
    assert submit_main(["--run", str(run)]) == 0
    original = (run / "tuned.json").read_bytes()
    tuned = json.loads(original)
    (run / "tuned.json").write_text(json.dumps(tuned | {"head_weight": 1 - tuned.get("head_weight", 0.5)}))
    assert "tuned.json" in one_line(capsys, submit_main, ["--run", run])
    (run / "tuned.json").write_bytes(original)
    assert submit_main(["--run", str(run)]) == 0  # back as it was: current again
    kit = run / "fold1/kit.safetensors"
    kit.write_bytes(kit.read_bytes())  # same bytes: not a change
    assert submit_main(["--run", str(run)]) == 0
    shutil.copy(run / "fold0/kit.safetensors", kit)  # a retrained fold
    assert "fold1/kit.safetensors" in one_line(capsys, submit_main, ["--run", run])

    b = tmp_path / "runs/b"
    shutil.copytree(trained_demo_run, b, ignore=shutil.ignore_patterns(".lock*", "predictions", "submission"))
    shutil.copy(trained_demo_run / "fold1/kit.safetensors", kit)
    assert blend_main(["--runs", str(run), str(b), "--name", "ab", "--data", str(demo)]) == 0
    read_blend(tmp_path / "runs/ab")
    # predictions of the blend stay current when the whole runs/ folder moves, with --run or without
    assert infer_main(["--run", str(tmp_path / "runs/ab"), "--data", str(demo / "test")]) == 0
    shutil.move(tmp_path / "runs", tmp_path / "moved")
    assert submit_main(["--run", str(tmp_path / "moved/ab")]) == 0
    assert submit_main(["--predictions", str(tmp_path / "moved/ab/predictions"), "--out", str(tmp_path / "o")]) == 0
    b = tmp_path / "moved/b"
    (b / "tuned.json").write_text(json.dumps(tuned | {"head_weight": 0.123}))  # member b re-scored
    with pytest.raises(BlendError, match=r"changed since \(\.\./b/tuned.json.*re-blend: python -m entrep.blend"):
        read_blend(tmp_path / "moved/ab")


def test_links_copies_and_hand_edits_never_give_a_false_verdict(tmp_path, capsys):
    """A run reached through a symlink compares as its target; a copied run's predictions are checked
    against the copy they sit in (without --run too); a symlinked output folder is swapped where it
    points; a made_from naming a FIFO-like or NUL-holding path is 'changed', never read or a traceback."""
    from entrep.commands.submit import main

    runs = tmp_path / "runs"
    a = runs / "a"
    _predictions(a, {"i2i": ["q.png"]})
    (a / "config.yaml").write_text("name: a\n")
    (runs / "b").mkdir()
    (runs / "b/tuned.json").write_text("{}")
    (tmp_path / "link").symlink_to(a)
    rec = fingerprints(tmp_path / "link", [a / "config.yaml", runs / "b/tuned.json"])
    assert set(rec) == {"config.yaml", "../b/tuned.json"} and changed_since(tmp_path / "link", rec) == []
    meta = json.loads((a / "predictions/meta.json").read_text())
    meta["made_from"] = {"run": str(a), "files": fingerprints(a, [a / "config.yaml"])}
    (a / "predictions/meta.json").write_text(json.dumps(meta))
    shutil.copytree(a, runs / "copy")
    (runs / "copy/config.yaml").write_text("name: copy, changed\n")
    line = one_line(capsys, main, ["--predictions", runs / "copy/predictions", "--out", tmp_path / "o"])
    assert f"made from {a}, checked against {runs / 'copy'}" in line
    assert main(["--predictions", str(a / "predictions"), "--out", str(tmp_path / "o")]) == 0
    (tmp_path / "shared").mkdir()
    (a / "submission").symlink_to(tmp_path / "shared")
    assert main(["--run", str(a)]) == 0
    assert (a / "submission").is_symlink() and (tmp_path / "shared/i2i.json").is_file()
    assert not [p for p in a.iterdir() if p.name.startswith(".submission")]
    assert fingerprint("/dev/null").startswith("not a file") and fingerprint("a\0b") is None
    assert changed_since(a, {"/dev/zero": None, "x\0y": "0"}) == ["/dev/zero", "x\0y"]
