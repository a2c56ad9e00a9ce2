import hashlib
import json
from pathlib import Path

import numpy as np

from entrep.data.release import load_release, load_test, read_query_lines
from entrep.data.synthetic import _case, make_demo, render
from entrep.labels import ENTREP_CLASSES


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    a = make_demo(tmp_path / "a", seed=5, size=48, cases=12, test_cases=6, public_cases=4)
    b = make_demo(tmp_path / "b", seed=5, size=48, cases=12, test_cases=6, public_cases=4)
    c = make_demo(tmp_path / "c", seed=6, size=48, cases=12, test_cases=6, public_cases=4)
    assert _digest(a) == _digest(b) != _digest(c)


def test_left_is_the_exact_mirror_of_right():
    rng = np.random.default_rng(0)
    for side in ("nose", "ear"):
        p = _case(rng, f"{side}-right")
        right, left = render(f"{side}-right", p, 64), render(f"{side}-left", p, 64)
        assert np.array_equal(left, right[:, ::-1])
        assert not np.array_equal(left, right)
    p = _case(rng, "vc-open")
    assert not np.array_equal(render("vc-open", p, 64), render("vc-closed", p, 64))


def test_demo_is_in_the_release_layouts(demo):
    df, rep = load_release(demo, ENTREP_CLASSES)
    assert set(df["source"]) == {"train", "public"}
    assert rep.case_fixes and not rep.missing and not rep.bad_images
    assert (df["y"] < 0).any() and df["partners"].map(len).sum() > 0 and df["captions"].map(len).sum() > 0
    ts = load_test(demo / "test")
    truth = {t: json.loads((demo / f"truth/{f}.json").read_text())
             for t, f in (("cls", "track1_cls"), ("i2i", "track2_i2i"), ("t2i", "track3_t2i"))}
    assert ts.cls == list(truth["cls"]) and ts.i2i == list(truth["i2i"]) and ts.t2i == list(truth["t2i"])
    assert read_query_lines(demo / "test/t2i.csv") == ts.t2i
    # Track 3 truth as the challenge has it: one target per caption, one of the carriers listed beside it
    any_carrier = json.loads((demo / "truth/any_carrier/track3_t2i.json").read_text())
    assert list(any_carrier) == ts.t2i and all(isinstance(v, str) for v in truth["t2i"].values())
    assert all(truth["t2i"][c] in any_carrier[c] for c in ts.t2i) and max(map(len, any_carrier.values())) > 1
    from entrep.leaderboard import read_truth  # the truth folder gives one file per track to `entrep.score`

    assert {t: Path(w).name for t, (w, _) in read_truth(demo / "truth", ["cls", "i2i", "t2i"]).items()} == {
        "cls": "track1_cls.json", "i2i": "track2_i2i.json", "t2i": "track3_t2i.json"}
    # findings carry a side: a caption of a left image names the left
    left = df[df["label"] == "nose-left"]
    assert all("left" in c for caps in left["captions"] for c in caps)


def test_demo_cli_refuses_a_non_empty_folder_and_a_useless_size(tmp_path, capsys):
    from conftest import one_line
    from entrep.commands.demo import main as demo_cli

    (tmp_path / "old").mkdir()
    (tmp_path / "old/keep.txt").write_text("mine")
    assert "exists and is not empty" in one_line(capsys, demo_cli, [tmp_path / "old"])
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["keep.txt"]
    assert "at least 32 px" in one_line(capsys, demo_cli, [tmp_path / "new", "--size", "0"])
    assert not (tmp_path / "new").exists()
