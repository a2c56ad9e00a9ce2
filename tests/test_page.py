"""report.html (entrep/page.py): what it shows is what the run's files say, it is one self-contained
file, it renders in a real headless Chromium with no console error, and it looks as it did (a
screenshot test on a fixed run directory). `make demo`'s pages are checked in tests/test_readme.py."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from browser import open_page
from entrep import rundir
from entrep.config import Config, save_config
from entrep.figures import worst_queries
from entrep.oof import Ranked
from entrep.page import read_page_data, write_page

NAMES = ["nose-right", "nose-left", "throat"]
REFERENCE = Path(__file__).parent / "fixtures" / "page" / "report.png"


def fixed_run(root: Path) -> tuple[Path, dict[str, Path]]:
    """A finished run's files, written by hand with fixed values (no training, nothing random), and
    the release's images they name."""
    run, data = root / "run", root / "data"
    images = data / "train" / "imgs"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = {}
    for i in range(12):
        name = f"img{i:02d}.png"
        base = np.zeros((48, 48, 3), np.uint8) + np.array([60 + 15 * i, 40, 200 - 12 * i], np.uint8)
        base[8 + i:20 + i, 10:38] = 255 - base[0, 0]
        Image.fromarray((base + rng.integers(0, 20, base.shape)).astype(np.uint8)).save(images / name)
        paths[name] = images / name
    labels = [NAMES[i % 3] for i in range(12)]
    (data / "train" / "cls.json").write_text(json.dumps(dict(zip(paths, labels))))  # the release's own layout
    probs = np.full((12, 3), 0.1)
    for i in range(12):
        probs[i, (i + (i % 4 == 0)) % 3] = 0.8  # every fourth image predicted as the next class
    run.mkdir()
    save_config(Config(), run / rundir.CONFIG)
    pd.DataFrame({"image": list(paths), "fold": [i % 2 for i in range(12)], "label": labels,
                  "pred": [NAMES[int(p.argmax())] for p in probs],
                  **{f"p_{n}": probs[:, j] for j, n in enumerate(NAMES)}}).to_csv(run / rundir.OOF_TABLE, index=False)
    pd.DataFrame({"image": list(paths), "label": labels, "group": range(12),
                  "fold_group": [0, 0, 0, 3, 4, 4, 6, 7, 8, 9, 10, 11], "fold": [i % 2 for i in range(12)],
                  "sha1": ["0" * 40] * 12}).to_csv(run / rundir.FOLDS, index=False)
    cm = [[3, 1, 0], [0, 3, 1], [1, 0, 3]]
    per_class = {n: {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4} for n in NAMES}
    fold_rows = [{"fold": k, "n_images": 6, "n_labelled": 6, "settings": {"head_weight": 0.5},
                  "classification": {"accuracy": 0.5 + 0.25 * k, "f1_macro": 0.4 + 0.2 * k, "f1_weighted": 0.5},
                  "i2i": {"mrr": 0.9 - 0.1 * k, "recall@1": 0.8}, "t2i": {"mrr": 0.3, "recall@1": 0.2 + 0.1 * k}}
                 for k in (0, 1)]
    report = {"classification": {"accuracy": 0.75, "f1_macro": 0.75, "f1_weighted": 0.75, "n": 12,
                                 "per_class": per_class, "confusion": cm},
              "i2i": {"mrr": 0.85, "recall@1": 0.8, "recall@5": 1.0, "recall@10": 1.0, "n_queries": 4},
              "t2i": {"mrr": 0.3, "recall@1": 0.25, "recall@5": 0.5, "recall@10": 0.75, "n_queries": 4},
              "folds": fold_rows, "how": {"classification": "pooled over folds"},
              "grouping": {"cap": 20}, "versions": {"python": "3.x", "torch": "fixed"}}
    (run / rundir.REPORT).write_text(json.dumps(report))
    failures = {"i2i": [{"fold": 0, "query": "img00.png", "rank": None, "top": ["img02.png", "img04.png"],
                         "relevant": ["img01.png"]}],
                "t2i": [{"fold": 1, "query": "a polyp <b>in</b> the left nasal cavity", "rank": 3,
                         "top": ["img05.png", "img07.png", "img09.png"], "relevant": ["img09.png"]}]}
    (run / rundir.FAILURES).write_text(json.dumps(failures))
    for k in (0, 1):
        (run / f"fold{k}").mkdir()
        pd.DataFrame({"epoch": [1, 2, 3], "loss": [3.0 - k, 2.0, 1.5], "ce": [1.0, 0.8, 0.6],
                      "val_f1_macro": [0.2, 0.4 + 0.1 * k, 0.5]}).to_csv(run / f"fold{k}" / rundir.HISTORY,
                                                                         index=False)
    return run, paths


def test_the_page_shows_what_the_run_files_say_in_one_file(tmp_path):
    run, paths = fixed_run(tmp_path)
    page = write_page(run, paths).read_text()
    # self-contained: every image inline, nothing fetched, no script
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    # per-fold figures with their spread over folds (sample std of 0.5 and 0.75)
    assert "0.625 &plusmn; 0.177" in page
    # the worst-classified image of each class is the one with the least probability of its class
    d = read_page_data(run)
    for label, rows in d.oof.groupby("label"):
        worst = rows.loc[rows[f"p_{label}"].idxmin(), "image"]
        section = page.split(f"<h3>{label}</h3>", 1)[1].split("</div>", 1)[0]
        assert f'alt="{worst}"' in section.split("<figure")[1], label
    # retrieval failures as failures.json holds them; a caption's markup is escaped, not rendered
    assert "fold 0, rank &gt; 10" in page and "a polyp &lt;b&gt;in&lt;/b&gt; the left nasal cavity" in page
    # the groups, largest first, and the recipe switches the run was trained with
    groups = page.split("Groups the folds were built from", 1)[1]
    assert groups.index("group 0: 3 images") < groups.index("group 4: 2 images")
    assert "<td>lora</td><td>rank 16</td>" in page and "<td>ema</td><td>off</td>" in page
    assert page.count('class="plot"') == 1  # the learning curves of both folds


def test_a_page_without_its_images_shows_their_names_and_says_so(tmp_path):
    run, paths = fixed_run(tmp_path)
    paths["img03.png"].write_bytes(b"not a png")
    page = write_page(run, {n: p for n, p in paths.items() if n != "img05.png"}).read_text()
    assert 'class="noimg" title="img03.png"' in page and 'class="noimg" title="img05.png"' in page
    assert "2 images could not be shown" in page


def test_the_page_renders_in_chromium_with_no_console_error_and_looks_as_it_did(tmp_path):
    run, paths = fixed_run(tmp_path)
    shot = tmp_path / "shot.png"
    seen = open_page(write_page(run, paths), screenshot=shot)
    assert seen["problems"] == []
    assert seen["broken"] == 0 and seen["images"] >= 12
    assert "Worst-classified images" in seen["text"] and "Groups the folds were built from" in seen["text"]
    if os.environ.get("ENTREP_UPDATE_SCREENSHOTS") == "1":
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE.write_bytes(shot.read_bytes())
    assert REFERENCE.is_file(), f"no reference screenshot: run with ENTREP_UPDATE_SCREENSHOTS=1 and look at {REFERENCE}"
    now, then = np.asarray(Image.open(shot).convert("RGB"), int), np.asarray(Image.open(REFERENCE).convert("RGB"), int)
    assert now.shape == then.shape, f"the page's height changed: {now.shape} vs {then.shape} (see {shot})"
    changed = (np.abs(now - then).max(-1) > 48).mean()
    assert changed < 0.005, f"{changed:.1%} of the page's pixels changed (see {shot} against {REFERENCE})"


def test_worst_queries_are_the_lowest_ranked_and_a_caption_appears_once(monkeypatch):
    from entrep import figures

    fake = {("i2i", 0): Ranked([["a", "b"], ["b", "a"], ["c", "a"]], [{"b"}, {"b"}, {"z"}], None, ["q1", "q2", "q3"]),
            ("i2i", 1): Ranked([["x", "y"]], [{"y"}], None, ["q4"]),
            ("t2i", 0): Ranked([["a", "b"], ["a", "b"]], [{"a"}, {"b"}], ["cap", "cap"], ["cap", "cap"]),
            ("t2i", 1): Ranked([], [], [], [])}

    class S:
        def __init__(self, k):
            self.view, self.rerank = k, {"i2i": None, "t2i": None}

    monkeypatch.setattr(figures, "track_rankings", lambda view, table, track, rerank: fake[(track, view)])
    out = worst_queries({0: S(0), 1: S(1)}, table=None, n=3)
    assert [(c["fold"], c["query"], c["rank"]) for c in out["i2i"]] == [(0, "q3", None), (0, "q1", 2), (1, "q4", 2)]
    assert [(c["query"], c["rank"], c["relevant"]) for c in out["t2i"]] == [("cap", 2, ["b"])]


def thumbnails(page: str) -> int:
    return len(set(re.findall(r'src="(data:image/jpeg[^"]+)"', page)))


def test_python_m_entrep_report_rebuilds_the_page_from_the_run_and_its_release(tmp_path):
    """The command on a run directory: thumbnails from the release its config names, image names and a
    warning where that release is gone, and thumbnails again from --data."""
    import subprocess
    import sys

    from entrep.config import load_config

    run, _ = fixed_run(tmp_path)

    def report(root, *extra):
        save_config(load_config(None, [f"data.root={root}"]), run / rundir.CONFIG)
        r = subprocess.run([sys.executable, "-m", "entrep.report", str(run), *extra], cwd=Path(__file__).parents[1],
                           capture_output=True, text=True, timeout=300, env=dict(os.environ, COLUMNS="300"))
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout + r.stderr, (run / rundir.PAGE).read_text()

    out, page = report(tmp_path / "data")
    assert str(run / rundir.PAGE) in out and thumbnails(page) == 12 and "could not be shown" not in page
    out, page = report(tmp_path / "gone")
    assert "is not found" in out and "12 images could not be shown" in page
    out, page = report(tmp_path / "gone", "--data", str(tmp_path / "data"))
    assert thumbnails(page) == 12 and "could not be shown" not in page


# ------------------------------------------------------------------------------ python -m entrep.runs
def test_the_runs_table_lists_every_run_and_blend_with_fold_spreads_sorts_and_diffs(tmp_path, capsys, monkeypatch):
    from entrep.cli import console
    from entrep.commands.runs import main, runs_table
    from entrep.config import load_config

    monkeypatch.setattr(console, "width", 250)  # a wide terminal: rows on one line each

    root = tmp_path / "runs"
    a, _ = fixed_run(tmp_path / "a")
    b, _ = fixed_run(tmp_path / "b")
    save_config(load_config(None, ["train.seed=1", "train.ema_decay=0.999"]), b / rundir.CONFIG)
    rep = json.loads((b / rundir.REPORT).read_text())
    rep["folds"][1]["classification"]["accuracy"] = 1.0
    (b / rundir.REPORT).write_text(json.dumps(rep))
    root.mkdir()
    a.rename(root / "a")
    (root / "abl_ablation").mkdir()
    b.rename(root / "abl_ablation" / "b")  # an ablation rung, one level deeper
    blend = root / "blend"
    blend.mkdir()
    (blend / rundir.REPORT).write_text(json.dumps(rep))
    (blend / rundir.BLEND).write_text(json.dumps({"members": ["../a", "../abl_ablation/b"]}))

    table = runs_table(root).set_index("run")
    assert set(table.index) == {"a", "abl_ablation/b", "blend"}
    assert table.loc["a", "accuracy"] == pytest.approx(0.625) and table.loc["a", "accuracy_std"] == pytest.approx(0.1768, abs=1e-4)
    assert table.loc["abl_ablation/b", "accuracy"] == pytest.approx(0.75)
    # the switches that differ between the runs, and only those
    assert table.loc["abl_ablation/b", "recipe"] == "ema 0.999 (debiased); seed 1" and table.loc["a", "recipe"] == "ema off; seed 42"
    assert table.loc["blend", "kind"] == "blend" and table.loc["blend", "backbone"] == "2 members"

    assert main([str(root), "--sort", "accuracy", "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert "0.625 ± 0.177" in out and out.index("abl_ablation/b") < out.index("│ a ")  # best first
    assert len(pd.read_csv(tmp_path / "t.csv")) == 3
    assert main(["--diff", str(root / "a"), str(root / "abl_ablation" / "b")]) == 0
    out = capsys.readouterr().out
    assert "train.seed" in out and "train.ema_decay" in out and "train.epochs" not in out
    assert "0.7500" in out  # both runs' pooled figures side by side


def test_the_runs_table_refuses_what_it_cannot_show_in_one_line(tmp_path, capsys):
    from conftest import one_line
    from entrep.commands.runs import main

    assert "not a folder" in one_line(capsys, main, [str(tmp_path / "nope")])
    assert "no run or blend" in one_line(capsys, main, [str(tmp_path)])
    fixed_run(tmp_path)
    assert "not a column" in one_line(capsys, main, [str(tmp_path), "--sort", "bogus"])
    assert "no report.json" in one_line(capsys, main, ["--diff", str(tmp_path / "run"), str(tmp_path)])


def test_the_page_reads_class_and_image_names_as_names_and_never_costs_the_report(tmp_path, monkeypatch, caplog):
    """Classes named "1", "2" and an image named like a number were read back as numbers (a TypeError
    after every fold had trained); an image over PIL's pixel limit is a name, not an error; and whatever
    else fails in the page leaves the report's set written, without a page of an earlier report."""
    import logging

    from PIL import Image

    from entrep import page
    from entrep.io import atomic_files

    run, paths = fixed_run(tmp_path)
    oof = pd.read_csv(run / rundir.OOF_TABLE)
    mapping = {n: str(i + 1) for i, n in enumerate(NAMES)}
    oof = oof.rename(columns={f"p_{n}": f"p_{mapping[n]}" for n in NAMES})
    oof["label"], oof["pred"] = oof["label"].map(mapping), oof["pred"].map(mapping)
    oof.loc[0, "image"] = "1e5"
    oof.to_csv(run / rundir.OOF_TABLE, index=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # every 48 x 48 image is now "too large"
    html = write_page(run, paths).read_text()
    assert "<h3>1</h3>" in html and 'title="1e5"' in html and "data:image/jpeg" not in html
    (run / rundir.PAGE).write_text("an earlier report's page")
    monkeypatch.setattr(page, "render", lambda *a: 1 / 0)
    caplog.set_level(logging.WARNING, logger="entrep")
    with atomic_files(run) as files:
        files.write_text("x.json", "{}")
        page.write_page_into(files, paths)
    assert (run / "x.json").is_file() and not (run / rundir.PAGE).exists()
    assert "report.html not written (ZeroDivisionError" in caplog.text and "python -m entrep.report" in caplog.text


def test_the_commands_skip_what_is_gone_or_unreadable_and_show_the_rest(tmp_path):
    """entrep.report on a blend whose first member is gone takes the next member's release; entrep.runs
    shows a run it cannot read as a row saying why."""
    from entrep.commands.report import release_paths
    from entrep.commands.runs import runs_table
    from entrep.config import load_config

    run, _ = fixed_run(tmp_path)
    save_config(load_config(None, [f"data.root={tmp_path / 'data'}"]), run / rundir.CONFIG)
    blend = tmp_path / "blend"
    blend.mkdir()
    (blend / rundir.REPORT).write_text((run / rundir.REPORT).read_text())
    (blend / rundir.BLEND).write_text(json.dumps({"members": ["../gone", "../run"]}))
    assert set(release_paths(blend, None)) == {f"img{i:02d}.png" for i in range(12)}
    (run / rundir.CONFIG).write_text("train:\n  epochs: 1\ntrain:\n  epochs: 2\n")  # hand-broken: a repeated key
    table = runs_table(tmp_path).set_index("run")
    assert table.loc["run", "kind"] == "unreadable" and "not valid yaml" in table.loc["run", "recipe"].lower()
    assert table.loc["blend", "kind"] == "blend"
    (blend / rundir.REPORT).write_text(json.dumps({"folds": "x"}))  # a field of another type
    assert runs_table(tmp_path).set_index("run").loc["blend", "kind"] == "unreadable"


def test_entrep_report_on_hand_edited_files_is_one_line(tmp_path, capsys):
    from conftest import one_line
    from entrep.commands.report import main

    run, _ = fixed_run(tmp_path)
    (run / rundir.FAILURES).write_text(json.dumps({"t2i": [{"fold": 0, "query": "q"}]}))  # no rank, no top
    assert f"{run}: unexpected content (KeyError" in one_line(capsys, main, [run])
