import json
import zipfile

import pytest

from conftest import one_line
from entrep.commands.score import main as score_main
from entrep.submission import SubmissionError, rankings_to_submission, validate, write_track


def test_validators_accept_good_and_reject_each_fault():
    q = ["a.png", "b.png"]
    validate("cls", {"a.png": 0, "b.png": 6}, q, n_classes=7)
    validate("i2i", {"a.png": "b.png", "b.png": ["a.png", "c.png"]}, q, {"a.png", "b.png", "c.png"})
    cases = [
        ("cls", {"a.png": 0}, "1 queries missing"),
        ("cls", {"a.png": 0, "b.png": 1, "c.png": 1}, "not in the query list"),
        ("cls", {"a.png": 0, "b.png": 7}, "int in 0..6"),
        ("cls", {"a.png": 0, "b.png": "1"}, "int in 0..6"),
        ("i2i", {"a.png": "b.png", "b.png": 3}, "expected an image name"),
        ("i2i", {"a.png": "zz.png", "b.png": "a.png"}, "not in the gallery"),
        ("i2i", {"a.png": "a.png", "b.png": "a.png"}, "retrieved itself"),
        ("t2i", {"a.png": ["b.png", "b.png"], "b.png": "a.png"}, "repeats"),
    ]
    for track, sub, msg in cases:
        with pytest.raises(SubmissionError, match=msg):
            validate(track, sub, q, {"a.png", "b.png"}, n_classes=7)


def test_zip_holds_one_json_at_root(tmp_path):
    js, zp = write_track("t2i", {"cap, with comma": "a.png"}, tmp_path / "out")
    with zipfile.ZipFile(zp) as z:
        assert z.namelist() == ["t2i.json"]
        assert json.loads(z.read("t2i.json")) == {"cap, with comma": "a.png"}
    assert json.loads(js.read_text()) == {"cap, with comma": "a.png"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t2i.json", "t2i.zip"]


def test_rankings_to_submission_top1_and_topk():
    r = {"q": [{"image": "a", "score": 0.9}, {"image": "b", "score": 0.5}]}
    assert rankings_to_submission(r, 1) == {"q": "a"}
    assert rankings_to_submission(r, 5) == {"q": ["a", "b"]}


def test_score_cli_top1_and_ranked_lists(tmp_path, capsys):
    truth = {"q1": "a", "q2": ["b", "c"], "q3": "d"}
    sub = {"q1": "a", "q2": ["x", "c"], "q3": ["y", "z"]}
    (tmp_path / "t.json").write_text(json.dumps(truth))
    (tmp_path / "s.json").write_text(json.dumps(sub))
    assert score_main(["--track", "t2i", "--submission", str(tmp_path / "s.json"),
                       "--truth", str(tmp_path / "t.json"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["recall@1"] == pytest.approx(1 / 3) and r["mrr"] == pytest.approx((1 + 0.5 + 0) / 3)
    (tmp_path / "t.json").write_text(json.dumps({"a.png": 1, "b.png": 2}))
    (tmp_path / "s.json").write_text(json.dumps({"a.png": 1}))
    score_main(["--track", "cls", "--submission", str(tmp_path / "s.json"), "--truth", str(tmp_path / "t.json"),
                "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["accuracy"] == 0.5 and r["missing"] == 1
    # a table of a top-1 submission says why R@5 equals R@1; one of ranked lists does not
    (tmp_path / "t.json").write_text(json.dumps(truth))
    for answers, said in (({"q1": "a", "q2": "x", "q3": ["y"]}, True), (sub, False)):
        (tmp_path / "s.json").write_text(json.dumps(answers))
        score_main(["--track", "t2i", "--submission", str(tmp_path / "s.json"), "--truth", str(tmp_path / "t.json")])
        assert ("R@5, R@10 and MRR equal R@1" in " ".join(capsys.readouterr().out.split())) == said


def _predictions(run, queries: dict, topk: int = 3):
    """A run's predictions folder as infer.py writes it, for a gallery of four images."""
    pred = run / "predictions"
    pred.mkdir(parents=True)
    gallery = ["g0.png", "g1.png", "g2.png", "g3.png"]
    ranked = [{"image": g, "score": 1 - i / 10} for i, g in enumerate(gallery[:topk])]
    (pred / "meta.json").write_text(json.dumps({
        "test_dir": "TEST", "topk": topk, "gallery": gallery, "labels": list("abcdefg"),
        "queries": queries, "on_disk": {q: q for q in queries.get("cls") or []}}))
    (pred / "classes.csv").write_text("image,pred_idx\n" + "".join(f"{q},1\n" for q in queries.get("cls") or []))
    for track in ("i2i", "t2i"):
        (pred / f"{track}.json").write_text(json.dumps({q: ranked for q in queries.get(track) or []}))


def test_submit_refuses_more_answers_than_the_predictions_hold(tmp_path):
    from entrep.commands.submit import main

    _predictions(tmp_path, {"i2i": ["q.png"]}, topk=3)
    with pytest.raises(SubmissionError, match=r"--topk 5, but .* holds top-3 rankings; re-run infer.py .*infer.topk=5"):
        main(["--run", str(tmp_path), "--topk", "5"])
    main(["--run", str(tmp_path), "--topk", "3"])
    assert json.loads((tmp_path / "submission/i2i.json").read_text()) == {"q.png": ["g0.png", "g1.png", "g2.png"]}


def test_submission_folder_never_mixes_two_prediction_sets(tmp_path):
    """A full submission, then predictions for a folder with cls.csv only: the old i2i/t2i files go."""
    import shutil

    from entrep.commands.submit import main

    _predictions(tmp_path, {"cls": ["c.png"], "i2i": ["q.png"], "t2i": ["a caption"]})
    main(["--run", str(tmp_path)])
    assert {p.name for p in (tmp_path / "submission").iterdir()} == {f"{t}.{e}" for t in ("cls", "i2i", "t2i")
                                                                      for e in ("json", "zip")}
    shutil.rmtree(tmp_path / "predictions")
    _predictions(tmp_path, {"cls": ["other.png"]})
    main(["--run", str(tmp_path)])
    assert {p.name for p in (tmp_path / "submission").iterdir()} == {"cls.json", "cls.zip"}
    assert json.loads((tmp_path / "submission/cls.json").read_text()) == {"other.png": 1}


def test_submit_out_that_is_a_file_is_one_line(tmp_path):
    from entrep.commands.submit import main

    _predictions(tmp_path, {"i2i": ["q.png"]})
    (tmp_path / "taken").write_text("x")
    with pytest.raises(SubmissionError, match=r"--out .*taken is a file; give a folder"):
        main(["--run", str(tmp_path), "--out", str(tmp_path / "taken")])


def _score(tmp_path, track, sub, truth, *extra):
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "s.json").write_text(json.dumps(sub))
    (tmp_path / "t.json").write_text(json.dumps(truth))
    return subprocess.run([sys.executable, "-m", "entrep.score", "--track", track, "--submission",
                           str(tmp_path / "s.json"), "--truth", str(tmp_path / "t.json"), *extra],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)


@pytest.mark.parametrize("track, sub, truth, message", [
    ("cls", {"a.png": 1}, {}, "no entries"),
    ("cls", {"a.png": 1}, {"a.png": 9}, "not class indices 0..6"),
    ("cls", {"a.png": 1}, {"a.png": "throat"}, "not class indices 0..6"),
    ("i2i", {"q": {"image": "a.png"}}, {"q": "a.png"}, "not an image name or a ranked list"),
    ("t2i", {"q": "a.png"}, {"q": 3}, "truth: 1 entries are not an image name"),
])
def test_score_errors_are_one_line(tmp_path, track, sub, truth, message, capsys):
    (tmp_path / "s.json").write_text(json.dumps(sub))
    (tmp_path / "t.json").write_text(json.dumps(truth))
    assert message in one_line(capsys, score_main, ["--track", track, "--submission", tmp_path / "s.json",
                                                    "--truth", tmp_path / "t.json"])


def test_score_warns_about_answers_that_cannot_be_right_and_prints_strict_json(tmp_path):
    r = _score(tmp_path, "cls", {"a.png": "3", "b.png": "nose-left", "c.png": 2}, {"a.png": 3, "b.png": 1,
                                                                                     "c.png": 2}, "--json")
    assert r.returncode == 0
    out = json.loads(r.stdout)
    assert out["accuracy"] == pytest.approx(1 / 3) and out["not_an_index"] == 2
    assert "2 answers are not class indices" in " ".join(r.stderr.split())
    assert "NaN" not in r.stdout
