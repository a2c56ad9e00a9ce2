"""Fault injection for every writer of the kit: the n-th write operation under the output folder fails
with ENOSPC or EROFS (for n = 1 .. every operation the write makes), and each time the entry point says
one line, no temp file is left, and the output holds the complete old set or the complete new set,
never a mix (issue 22.2)."""
import builtins
import errno
import hashlib
import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import entrep.model.checkpoint as checkpoint
from entrep.cli import run_main

ERRNOS = (errno.ENOSPC, errno.EROFS)


class Faults:
    """Counts the write operations under `root` (opening a file to write, os.open with a write flag,
    mkdir, rename/replace, fallocate, a safetensors save, a zip member) and makes the n-th one raise
    OSError(err) without a file name, as a full disk's write() does, and every later data write too;
    safetensors fails as it does on a full disk, after writing part of the file."""

    def __init__(self, monkeypatch):
        self.root, self.count, self.fail_at, self.err, self.every = None, 0, None, errno.ENOSPC, False
        real_open, real_os_open = builtins.open, os.open
        real = {name: getattr(os, name) for name in ("replace", "rename", "mkdir", "posix_fallocate")}
        real_save, real_writestr = checkpoint.save_file, zipfile.ZipFile.writestr

        def opened(file, mode="r", *a, **k):
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
                self.tick(file)
            return real_open(file, mode, *a, **k)

        def os_open(path, flags, *a, **k):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                self.tick(path)
            return real_os_open(path, flags, *a, **k)

        def wrap(name, path_arg):
            def f(*a, **k):
                if not (name == "mkdir" and os.path.lexists(a[0])):  # an existing folder fails with EEXIST first
                    self.tick(a[path_arg] if path_arg is not None else self.root, rename=name in ("replace", "rename"))
                return real[name](*a, **k)
            return f

        def save_file(tensors, filename, *a, **k):
            try:
                self.tick(filename)
            except OSError:
                Path(filename).write_bytes(b"\0" * 10)  # what a full disk leaves before safetensors gives up
                from safetensors import SafetensorError
                raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(self.err)} (os error {self.err})")
            return real_save(tensors, filename, *a, **k)

        def writestr(z, *a, **k):
            self.tick(z.filename)
            return real_writestr(z, *a, **k)

        monkeypatch.setattr(builtins, "open", opened)
        monkeypatch.setattr(io, "open", opened)
        monkeypatch.setattr(os, "open", os_open)
        for name, arg in (("replace", 1), ("rename", 1), ("mkdir", 0), ("posix_fallocate", None)):
            monkeypatch.setattr(os, name, wrap(name, arg))
        monkeypatch.setattr(checkpoint, "save_file", save_file)
        monkeypatch.setattr(zipfile.ZipFile, "writestr", writestr)

    def tick(self, path, rename: bool = False) -> None:
        """One write operation on `path`. Once the fault has fired, data writes keep failing (a full disk
        stays full: zipfile, for one, retries a failed open) while renames succeed (they need no space),
        unless `every` (a read-only folder)."""
        if self.root is None or not self.covers(path):
            return
        self.count += 1
        if self.fail_at is not None and (self.count == self.fail_at or (
                self.count > self.fail_at and (self.every or not rename))):
            raise OSError(self.err, os.strerror(self.err))

    def arm(self, root: Path, fail_at: int | None = None, err: int = errno.ENOSPC, every: bool = False) -> None:
        """Count from now; the `fail_at`-th operation fails (`every`: and all after it, a read-only folder)."""
        self.root, self.count, self.fail_at, self.err, self.every = root, 0, fail_at, err, every

    def off(self) -> None:
        self.root = None

    def covers(self, path) -> bool:
        """`path` is under root, or is (or is under) a temp or set-aside sibling of root (`.NAME.*`): when root
        is one unit's own folder, the unit is written beside it and swapped in."""
        if not isinstance(path, (str, os.PathLike)):
            return False
        path, root = Path(os.path.abspath(path)), Path(os.path.abspath(self.root))
        return any(p == root or (p.parent == root.parent and p.name.startswith(f".{root.name}."))
                   for p in (path, *path.parents))


@pytest.fixture()
def faults(monkeypatch):
    return Faults(monkeypatch)


def state(folder: Path) -> dict:
    """Every file under `folder` by content, the kit's hidden temp and lock names left out."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.startswith(".") and (".tmp" in p.name or ".old-" in p.name)]


def exercise(tmp_path, faults, capsys, write, *, every=True, samples=(), expect_error=True):
    """`write(root, version)` writes version 0 (the old set) or 1 (the new one) under root. The new write
    is made with the n-th operation failing, for every n (or `samples`), on a copy of the old state."""
    base = tmp_path / "base"
    base.mkdir(parents=True)
    write(base, 0)
    old = state(base)
    probe = tmp_path / "probe"
    shutil.copytree(base, probe)
    faults.arm(probe)
    write(probe, 1)
    n_ops, new = faults.count, state(probe)
    faults.off()
    capsys.readouterr()
    assert n_ops > 0 and new != old
    ns = range(1, n_ops + 1) if every else sorted({n for n in samples if n <= n_ops} | {1, n_ops})
    for n in ns:
        for err in (ERRNOS if every else ERRNOS[n % 2:][:1]):  # sampled writers: one errno per n, both in turn
            root = tmp_path / f"n{n}-{err}"
            shutil.copytree(base, root)
            faults.arm(root, n, err)
            rc = run_main(lambda argv: write(root, 1) or 0)
            faults.off()
            out = capsys.readouterr()
            if not expect_error:
                assert rc == 0, (n, err, out.out)
            else:
                assert rc == 2, (n, err)
                lines = out.out.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("error: cannot write "), (n, out.out)
                assert os.strerror(err) in lines[0] and "Traceback" not in out.out + out.err
            got = state(root)
            assert got in (old, new), (n, err, sorted(set(got.items()) ^ set(old.items()))[:4])
            assert not leftovers(root), (n, err, leftovers(root))
            shutil.rmtree(root)
    return n_ops


def test_config_yaml(tmp_path, faults, capsys):
    from entrep.config import load_config, save_config

    exercise(tmp_path, faults, capsys,
             lambda root, v: save_config(load_config(None, [f"train.epochs={1 + v}"]), root / "config.yaml"))


def _table(n=12):
    return pd.DataFrame({"image": [f"i{j}.png" for j in range(n)], "label": ["a", "b"] * (n // 2),
                         "y": [0, 1] * (n // 2), "partners": [[] for _ in range(n)],
                         "sha1": [f"{j:040x}" for j in range(n)]})


def test_folds_csv_made_and_copied(tmp_path, faults, capsys):
    from entrep.data.folds import load_or_make_folds

    df = _table()

    def made(root, v):
        if v:  # the old state holds no folds.csv: it is written once
            load_or_make_folds(root / "folds.csv", df, 2, seed=3)

    exercise(tmp_path / "made", faults, capsys, made)
    src = tmp_path / "src.csv"
    load_or_make_folds(src, df, 2, seed=5)

    def copied(root, v):
        if v:
            load_or_make_folds(root / "folds.csv", df, 2, seed=3, source=src)

    exercise(tmp_path / "copied", faults, capsys, copied)


def test_report_set(tmp_path, faults, capsys):
    """tuned.json, oof.csv, report.json and the plots: one unit beside the run's other files."""
    from entrep.config import load_config
    from entrep.io import atomic_files
    from entrep.figures import crossfit_figures, write_scored
    from entrep.tuning import tune
    from test_report import NAMES, synthetic_oof

    cfg = load_config(None, ["model.pretrained=", "infer.tta_flip=false", "rerank.methods=[dba]"])
    reports = []
    for s in (0, 1):
        oof, table = synthetic_oof(seed=s, folds=2, per_fold=8)
        figures, scored = crossfit_figures(oof, table, NAMES, cfg)
        reports.append((figures, tune(oof, table, NAMES, cfg), scored, table))

    def write(root, v):
        if not (root / "config.yaml").exists():
            (root / "config.yaml").write_text("kept: as it is\n")
        figures, tuned, scored, table = reports[v]
        with atomic_files(root) as files:  # what write_report does once the figures are computed
            write_scored(files, figures, tuned, scored, table, NAMES)

    n = exercise(tmp_path, faults, capsys, write, every=False, samples=(3, 9, 12, 14, 16))
    assert n >= 10  # five files written to temps, then renamed in


class FakeClip:
    """What save_weights reads of a model with LoRA: save_pretrained (peft writes the adapter 0600)."""

    def __init__(self, v):
        self.v = v

    def save_pretrained(self, folder):
        os.mkdir(folder)
        with open(Path(folder) / "adapter_config.json", "w") as f:
            f.write('{"r": %d}' % (4 + self.v))
        checkpoint.save_file({"w": torch.full((4,), float(self.v))}, str(Path(folder) / "adapter_model.safetensors"))
        os.chmod(Path(folder) / "adapter_model.safetensors", 0o600)


class FakeModel:
    levels, embed_dim = [1], 4

    def __init__(self, v):
        self.clip, self.v = FakeClip(v), v

    def kit_state_dict(self):
        return {"head": torch.full((2,), float(self.v))}


def test_a_fold_folder(tmp_path, faults, capsys):
    """The fold's weights (adapter folder, kit.safetensors, meta.json), history, OOF file and metrics.json
    are one unit: a retrained fold is never its new weights beside the old metrics.json."""
    from entrep.training import write_fold
    from test_report import synthetic_oof

    oof, _ = synthetic_oof(folds=2, per_fold=6)

    def write(root, v):
        write_fold(root / "fold0", FakeModel(v), {"fold": 0, "v": v}, [{"epoch": 1, "loss": v}], oof[0],
                   {"last_loss": v})

    exercise(tmp_path, faults, capsys, write)
    # safetensors' own failure on a full disk (SafetensorError) is the OSError it is, naming the file
    faults.arm(tmp_path / "x", 3)
    with pytest.raises(OSError, match="No space left on device") as e:
        write(tmp_path / "x", 1)
    assert not (tmp_path / "x/fold0").exists() and not leftovers(tmp_path / "x")
    assert str(tmp_path / "x/fold0") in str(e.value)


def test_save_weights_alone_is_one_unit(tmp_path, faults, capsys):
    exercise(tmp_path, faults, capsys, lambda root, v: checkpoint.save_weights(FakeModel(v), root / "fold0", {"v": v}))


def test_predictions_folder(tmp_path, faults, capsys):
    from entrep.inference import Predictions

    def write(root, v):
        classes = pd.DataFrame({"image": ["a.png", "b.png"], "pred": ["x", "y"], "pred_idx": [v, 1 - v]})
        ranked = {"a.png": [{"image": "b.png", "score": 0.5 + v}]}
        Predictions(classes, ranked, ranked, {"v": v}).write(root / "predictions")

    exercise(tmp_path, faults, capsys, write)


def test_submission_folder_through_submit_py(tmp_path, faults, capsys):
    """submit.py's json + zip of every track: the folder holds one predictions set's files."""
    from entrep.commands.submit import main
    from test_submission import _predictions

    preds = []
    for v, queries in enumerate(({"cls": ["c.png"], "i2i": ["q.png"], "t2i": ["a caption"]}, {"cls": ["d.png"]})):
        _predictions(tmp_path / f"p{v}", queries)
        preds.append(tmp_path / f"p{v}/predictions")

    def write(root, v):
        assert main(["--predictions", str(preds[v]), "--out", str(root / "submission")]) == 0

    exercise(tmp_path / "runs", faults, capsys, write)


def test_blend_outputs(tmp_path, faults, capsys):
    from entrep.ensemble import write_blend
    from entrep.config import load_config
    from entrep.figures import crossfit_figures
    from entrep.tuning import tune
    from test_report import NAMES, synthetic_oof

    cfg = load_config(None, ["model.pretrained=", "infer.tta_flip=false", "rerank.methods=[dba]"])
    made = []
    for s in (0, 1):
        oof, table = synthetic_oof(seed=s, folds=2, per_fold=8)
        figures, scored = crossfit_figures(oof, table, NAMES, cfg)
        folds = pd.DataFrame({"image": table["image"], "fold": [k for k, f in oof.items() for _ in f.images]})
        made.append((folds, figures, tune(oof, table, NAMES, cfg), scored, table))

    def write(root, v):
        folds, figures, tuned, scored, table = made[v]
        write_blend(root / "blend", folds, figures, tuned, scored, table, NAMES, {"members": ["../a", "../b"], "v": v})

    exercise(tmp_path, faults, capsys, write, every=False, samples=(3, 10, 14, 16, 18))


def test_ablation_table(tmp_path, faults, capsys):
    from entrep.commands.ablate import write_table

    def write(root, v):
        t = pd.DataFrame({"rung": ["1_baseline", "2_lora"], "accuracy": [0.5, 0.6 + v / 10], "f1_macro": [0.4, 0.5],
                          "i2i_R@1": [0.1, 0.2], "i2i_MRR": [0.2, 0.3], "t2i_R@1": [0.0, 0.1], "t2i_MRR": [0.1, 0.2],
                          "trainable_params": [10, 20], "wall_s": [1.0, 2.0], "reused_folds_of": ["", ""]})
        write_table(root, t)

    exercise(tmp_path, faults, capsys, write, every=False, samples=(2, 4, 6, 8, 9))


def test_demo_dataset(tmp_path, faults, capsys):
    from entrep.commands.demo import main

    def write(root, v):
        if v:  # the old state holds no dataset; a failed one leaves nothing that blocks a re-run
            assert main([str(root / "demo"), "--size", "32", "--cases", "2", "--test-cases", "2"]) == 0

    exercise(tmp_path, faults, capsys, write, every=False, samples=(2, 3, 10, 40, 80))


def test_image_cache_segments_and_index(tmp_path, faults, capsys, caplog):
    """A cache write that fails (a full disk, a read-only cache) falls back to decoding in memory with
    the same pixels; the cache keeps only complete segments its index names, and fills later."""
    from conftest import placeholder
    from entrep.data.images import ImageCache
    from entrep.data.release import file_sha1

    paths = []
    for i in range(4):
        placeholder(tmp_path / f"imgs/{i}.png", i, size=20)
        paths.append(str(tmp_path / f"imgs/{i}.png"))
    hashes = [file_sha1(Path(p)) for p in paths]
    want = np.asarray(ImageCache(tmp_path / "ref", 16).pixels(paths, hashes))

    def write(root, v):
        n = 2 + 2 * v  # the old cache holds two images, the new one four
        got = np.asarray(ImageCache(root / "cache", 16).pixels(paths[:n], hashes[:n]))
        assert (got == want[:n]).all()

    exercise(tmp_path / "c", faults, capsys, write, expect_error=False)
    root = tmp_path / "after"
    shutil.copytree(tmp_path / "c/base", root)
    faults.arm(root, 1, errno.EROFS)
    ImageCache(root / "cache", 16).pixels(paths, hashes)
    faults.off()
    assert "not writable" in caplog.text and "decoding 2 images in memory" in caplog.text
    cache = ImageCache(root / "cache", 16)
    assert (np.asarray(cache.pixels(paths, hashes)) == want).all()
    assert len(cache._read_index()["slots"]) == 4  # written once the folder is writable again


def test_every_os_error_escaping_an_entry_point_is_one_line_naming_the_path(capsys):
    for err in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.ENOENT, errno.EIO):
        def main(argv=None, err=err):
            raise OSError(err, os.strerror(err), "/data/runs/x/report.json")

        assert run_main(main) == 2
        out = capsys.readouterr().out
        assert out.count("\n") == 1 and "/data/runs/x/report.json" in out and os.strerror(err) in out, out
        assert ("cannot write" in out) == (err not in (errno.ENOENT, errno.EIO))
