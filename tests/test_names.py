"""Names as the query lists spell them (issue 31, class 3): whatever case the disk uses, every name a
submission writes, key or answer, is the list's; captions split at line endings only; a header line
in t2i.csv is refused as cls.csv's is; two images under one name in two track folders get advice
that keeps the submission's keys."""
import json
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import placeholder
from entrep.data.release import DataError, load_test
from test_properties import budget

STEMS = [f"b32f{i:02d}" for i in range(8)]


def respell(name: str, how: int) -> str:
    """One of the spellings a disk may use for a listed name."""
    stem, ext = name.rsplit(".", 1)
    return [name, f"{stem}.{ext.upper()}", f"{stem.upper()}.{ext}", name.upper()][how]


@budget(40)
@given(cases=st.lists(st.integers(0, 3), min_size=len(STEMS), max_size=len(STEMS)),
       in_cls=st.sets(st.sampled_from(STEMS), min_size=1), in_i2i=st.sets(st.sampled_from(STEMS), min_size=1))
def test_every_answer_is_spelled_as_the_lists_spell_it(tmp_path_factory, cases, in_cls, in_i2i):
    root = tmp_path_factory.mktemp("t")
    for i, (stem, how) in enumerate(zip(STEMS, cases)):
        placeholder(root / "imgs" / respell(f"{stem}.png", how), seed=i)
    (root / "cls.csv").write_text("\n".join(f"{s}.png" for s in sorted(in_cls)) + "\n")
    (root / "i2i.csv").write_text("\n".join(f"{s}.png" for s in sorted(in_i2i)) + "\n")
    test = load_test(root)
    for track in ("i2i", "t2i"):
        spelled = test.spelling(track)
        answers = {spelled.get(n, n) for n in test.images}
        listed = {f"{s}.png" for s in in_cls | in_i2i}
        # a listed image is answered under its listed name only, never under the disk's
        assert listed <= answers
        assert not any(n.lower() in listed and n not in listed for n in answers)
        # an image no list names keeps the only name it has
        assert {n for n in answers if n.lower() not in listed} == {n for n in test.images if n.lower() not in listed}


@pytest.mark.parametrize("header", ["caption", "Captions", "text", "query", "t2i"])
def test_a_header_line_in_t2i_csv_is_refused_as_one_in_cls_csv_is(tmp_path, header):
    placeholder(tmp_path / "a.png", seed=0)
    (tmp_path / "t2i.csv").write_text(f"{header}\na polyp in the left nasal cavity\n")
    with pytest.raises(DataError, match=r"t2i.csv line 1: .* reads as a column header"):
        load_test(tmp_path)
    (tmp_path / "t2i.csv").write_text("a polyp in the left nasal cavity\ntext on the scope\n")
    assert load_test(tmp_path).t2i == ["a polyp in the left nasal cavity", "text on the scope"]


def test_two_images_named_alike_in_two_track_folders_get_advice_that_keeps_the_keys(tmp_path):
    placeholder(tmp_path / "Track1_Public" / "imgs" / "a.png", seed=0)
    placeholder(tmp_path / "Track2_Public" / "imgs" / "a.png", seed=1)
    with pytest.raises(DataError) as e:
        load_test(tmp_path)
    assert "rename" not in str(e.value).replace("renaming either would change", "")
    assert "once per track folder" in str(e.value)


@pytest.mark.slow
def test_a_test_folder_in_upper_case_gives_the_submission_the_lower_case_lists_give(demo, trained_demo_run, tmp_path):
    """The same pixels under `.PNG` while the lists say `.png`: the same submission, every key and answer
    as the lists spell it (tracks 2 and 3 scored 0 when answers kept the disk's case)."""
    import shutil
    import subprocess

    root = Path(__file__).parents[1]
    upper = tmp_path / "test"
    shutil.copytree(demo / "test", upper)
    for p in list(upper.rglob("*.png")):
        p.rename(p.with_name(p.stem + ".PNG"))
    subs = {}
    for name, data in (("lower", demo / "test"), ("upper", upper)):
        pred, out = tmp_path / f"pred_{name}", tmp_path / f"sub_{name}"
        for cmd in (["infer.py", "--run", trained_demo_run, "--data", data, "--out", pred],
                    ["submit.py", "--run", trained_demo_run, "--predictions", pred, "--out", out, "--topk", "5"]):
            r = subprocess.run([sys.executable, *map(str, cmd)], cwd=root, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        subs[name] = {t: json.loads((out / f"{t}.json").read_text()) for t in ("cls", "i2i", "t2i")}
    assert subs["upper"] == subs["lower"]
    assert not any(a.endswith(".PNG") for t in ("i2i", "t2i") for answers in subs["upper"][t].values()
                   for a in answers)
