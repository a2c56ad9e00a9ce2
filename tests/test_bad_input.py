"""Issue 22, round two: each class of silently wrong input, through the kit's entry points where it can
be reached without a trained model (the slow tier holds the end-to-end cases on a trained run)."""
import errno
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from conftest import one_line, placeholder
from entrep.cli import run_main
from entrep.errors import EntrepError

ROOT = Path(__file__).parents[1]
LABELS = ["nose-right", "nose-left", "ear-right", "ear-left", "vc-open", "vc-closed", "throat"]


# ------------------------------------------------------------------ 1. a fold used half-present

def fake_fold(folder: Path, lora: bool = True) -> None:
    """A finished fold's files as save_weights and train_fold write them."""
    folder.mkdir(parents=True)
    save_file({"head": torch.zeros(3)}, str(folder / "kit.safetensors"))
    if lora:
        (folder / "adapter").mkdir()
        (folder / "adapter/adapter_config.json").write_text('{"r": 4}')
        save_file({"lora_A": torch.zeros(4, 4)}, str(folder / "adapter/adapter_model.safetensors"))
    (folder / "meta.json").write_text(json.dumps({"model_name": "entrep-tiny", "labels": LABELS, "lora": lora}))
    (folder / "metrics.json").write_text("{}")


@pytest.mark.parametrize("damage, named", [
    (lambda f: shutil.rmtree(f / "adapter"), "fold1/adapter/adapter_config.json: missing"),
    (lambda f: (f / "adapter/adapter_model.safetensors").unlink(), "adapter/adapter_model.safetensors: missing"),
    (lambda f: os.truncate(f / "adapter/adapter_model.safetensors", 40), "adapter_model.safetensors: truncated"),
    (lambda f: os.truncate(f / "adapter/adapter_model.safetensors", 100), "adapter_model.safetensors: truncated"),
    (lambda f: (f / "adapter/adapter_config.json").write_text("{"), "adapter_config.json: unreadable"),
    (lambda f: (f / "kit.safetensors").unlink(), "fold1/kit.safetensors: missing"),
    (lambda f: (f / "kit.safetensors").write_bytes(b"\x80\x04pickle"), "kit.safetensors: not a safetensors file"),
    (lambda f: (f / "meta.json").write_text('{"lora": "yes"}'), "meta.json: unexpected content"),
    (lambda f: (f / "meta.json").write_text("[1]"), "meta.json: expected a JSON object"),
])
def test_a_damaged_fold_is_one_line_naming_the_file_and_the_retrain(tmp_path, damage, named):
    from entrep.model.checkpoint import CheckpointError, verify_fold

    run = tmp_path / "runs/r"
    for k in (0, 1):
        fake_fold(run / f"fold{k}")
    assert verify_fold(run / "fold1", True)["lora"] is True
    damage(run / "fold1")
    with pytest.raises(CheckpointError) as e:
        verify_fold(run / "fold1", True)
    assert named in str(e.value) and f"train.py --name r output_dir={tmp_path / 'runs'} train.folds=[1]" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_fold_trained_without_lora_is_not_loaded_onto_a_lora_model(tmp_path):
    import peft

    from entrep.model.checkpoint import CheckpointError, load_fold_weights, verify_fold

    fake_fold(tmp_path / "fold0", lora=False)
    with pytest.raises(CheckpointError, match="trained without LoRA, but the run config says model.lora.enabled=true"):
        verify_fold(tmp_path / "fold0", True)
    # load_fold_weights itself: no adapter on a LoRA model would leave the fold loaded before active
    clip = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), peft.LoraConfig(target_modules=["0"], r=2))
    model = SimpleNamespace(clip=clip, load_kit_state_dict=lambda s: None, eval=lambda: None)
    with pytest.raises(CheckpointError, match=r"fold0/adapter: missing, but the model has LoRA"):
        load_fold_weights(model, tmp_path / "fold0", "fold0")


def test_peft_never_asks_the_hub_for_a_missing_adapter_file(tmp_path, monkeypatch):
    import peft

    from entrep.model.checkpoint import CheckpointError, load_fold_weights

    def hub(*a, **k):
        raise AssertionError("peft was asked to load an adapter folder that lacks its files")

    monkeypatch.setattr(peft.PeftModel, "load_adapter", hub)
    fake_fold(tmp_path / "fold1")
    (tmp_path / "fold1/adapter/adapter_config.json").unlink()
    clip = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), peft.LoraConfig(target_modules=["0"], r=2))
    with pytest.raises(CheckpointError, match="adapter_config.json: missing"):
        load_fold_weights(SimpleNamespace(clip=clip), tmp_path / "fold1", "fold1")


# ------------------------------------------------------------------ 3. read-only runs, 4. run-defining keys, 8, 9

@pytest.fixture()
def fake_run(tmp_path):
    """A run directory as far as predict reads it before any fold: config.yaml (3 folds), no fold yet."""
    from entrep.config import load_config, save_config

    run = tmp_path / "runs/r"
    save_config(load_config(ROOT / "configs/demo.yaml", ["cv.n_splits=3", f"output_dir={tmp_path / 'runs'}"]),
                run / "config.yaml")
    test = tmp_path / "test"
    for i in range(3):
        placeholder(test / f"imgs/{i}.png", i)
    (test / "cls.csv").write_text("0.png\n1.png\n")
    return run, test


@pytest.mark.parametrize("override, keys", [
    (["cv.n_splits=2"], "cv.n_splits defines the run"),
    (["model.lora.rank=4", "model.name=ViT-B-32"], "model.lora.rank, model.name define the run"),
    (["labels.names=[nose-left,nose-right,ear-right,ear-left,vc-open,vc-closed,throat]"], "labels.names defines the run"),
    (["loss.text=0"], "loss.text defines the run"),
])
def test_inference_refuses_an_override_of_a_run_defining_key(fake_run, capsys, override, keys):
    from entrep.commands.infer import main

    run, test = fake_run
    line = one_line(capsys, main, ["--run", run, "--data", test, *override])
    assert keys in line and "cannot be changed at inference" in line
    # a scoring key, and a run-defining key given its own value, pass: predict goes on to the folds
    line = one_line(capsys, main, ["--run", run, "--data", test, "infer.topk=3", "cv.n_splits=3", "rerank.k1=5"])
    assert "no finished fold" in line


def test_keyword_overrides_of_any_type(fake_run, monkeypatch):
    """entrep.predict(..., infer__gallery=Path(...)) was a TypeError (json.dumps of a Path)."""
    import entrep
    import entrep.inference as inference

    run, test = fake_run
    (test / "gallery.txt").write_text("0.png\n1.png\n2.png\n")
    seen = {}

    def spy(run_, cfg, partial):
        seen["cfg"] = cfg
        raise inference.RunError("stop here")

    monkeypatch.setattr(inference, "fold_dirs", spy)
    with pytest.raises(inference.RunError, match="stop here"):
        entrep.predict(run, test, infer__gallery=test / "gallery.txt", infer__topk=np.int64(3), infer__tta_flip=False,
                       rerank__methods=("dba", "qe"), infer__head_weight=0.25, model__slerp__alpha=np.float32(0.5))
    cfg = seen["cfg"]
    assert cfg.infer.gallery == str(test / "gallery.txt") and cfg.infer.topk == 3 and cfg.infer.tta_flip is False
    assert cfg.rerank.methods == ["dba", "qe"] and cfg.infer.head_weight == 0.25 and cfg.model.slerp.alpha == 0.5


def test_override_items_read_back_as_given():
    from entrep.config import override_item, parse_override

    for value, want in ((Path("/a b/c: d.txt"), "/a b/c: d.txt"), (Path("123"), "123"), (True, True), (3, 3),
                        (2.5, 2.5), ([0, 2], [0, 2]), (("a, b", "c: d"), ["a, b", "c: d"]), (None, None),
                        (np.int64(7), 7), (np.float32(0.5), 0.5), ("x=y", "x=y")):
        key, got = parse_override(override_item("k", value))
        assert key == "k" and got == want and type(got) is type(want), value


def test_a_missing_faiss_is_said_before_any_fold_is_embedded(fake_run, monkeypatch):
    import entrep
    from entrep.inference import RunError

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    run, test = fake_run
    with pytest.raises(RunError, match=r"infer.search=faiss-flat needs faiss: pip install faiss-cpu"):
        entrep.predict(run, test, infer__search="faiss-flat")  # the run has no fold: nothing was embedded


def test_an_unwritable_image_cache_decodes_in_memory_and_says_so_once(tmp_path, monkeypatch, caplog):
    import entrep.data.images as images
    from entrep.data.release import file_sha1

    paths = []
    for i in range(3):
        placeholder(tmp_path / f"imgs/{i}.png", i, size=20)
        paths.append(str(tmp_path / f"imgs/{i}.png"))
    hashes = [file_sha1(Path(p)) for p in paths]
    want = np.asarray(images.ImageCache(tmp_path / "ok", 16).pixels(paths, hashes))
    real_mkdir = os.mkdir

    def read_only(path, *a, **k):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", read_only)
    for _ in range(2):
        got = np.asarray(images.ImageCache(tmp_path / "ro/.image_cache", 16).pixels(paths, hashes))
        assert (got == want).all()
    assert caplog.text.count("is not writable (Read-only file system): decoding 3 images in memory") == 1
    assert not (tmp_path / "ro").exists()


def test_submit_takes_predictions_from_elsewhere_and_writes_nothing_under_the_run(tmp_path):
    from entrep.commands.submit import main
    from test_submission import _predictions

    _predictions(tmp_path / "elsewhere", {"cls": ["c.png"], "i2i": ["q.png"]})
    run = tmp_path / "ro_run"
    run.mkdir()
    assert main(["--run", str(run), "--predictions", str(tmp_path / "elsewhere/predictions"),
                 "--out", str(tmp_path / "sub")]) == 0
    assert list(run.iterdir()) == [] and {p.name for p in (tmp_path / "sub").iterdir()} == {
        "cls.json", "cls.zip", "i2i.json", "i2i.zip"}
    assert main(["--predictions", str(tmp_path / "elsewhere/predictions"), "--out", str(tmp_path / "sub2")]) == 0


def test_an_output_folder_holding_other_files_is_refused_not_replaced(tmp_path, capsys):
    from entrep.commands.submit import main
    from test_submission import _predictions

    _predictions(tmp_path, {"cls": ["c.png"]})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    line = one_line(capsys, main, ["--run", tmp_path, "--out", tmp_path / "mine"])
    assert "holds files that are not this output's (notes.txt)" in line
    assert (tmp_path / "mine/notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------ 5. per-track test folders, 7. tiny galleries

def release_test_layout(root: Path) -> dict[str, list[str]]:
    """The release's own test layout: Track1_Public/{imgs,cls.csv}, Track2_Public/{imgs,i2i.csv},
    Track3_Public/{imgs,t2i.csv}; one picture filed in two tracks (same bytes, same name)."""
    names = {"Track1_Public": [f"c{i}.png" for i in range(4)], "Track2_Public": [f"r{i}.png" for i in range(5)],
             "Track3_Public": [f"t{i}.png" for i in range(3)]}
    for j, (track, files) in enumerate(names.items()):
        for i, n in enumerate(files):
            placeholder(root / track / "imgs" / n, 100 * j + i)
    shutil.copy(root / "Track1_Public/imgs/c0.png", root / "Track2_Public/imgs/c0.png")
    (root / "Track1_Public/cls.csv").write_text("c0.png\nc1.png\n")
    (root / "Track2_Public/i2i.csv").write_text("r0.png\nr1.png\n")
    (root / "Track3_Public/t2i.csv").write_text("a polyp\n")
    return names


def synthetic_view(test):
    from entrep.oof import FoldView

    names = sorted(test.images)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(names), 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    probs = np.full((len(names), 7), 1 / 7, np.float32)
    return FoldView(images=names, probs=probs, ret={"i2i": emb, "t2i": emb}, captions=test.t2i or [],
                    caption_emb=emb[:len(test.t2i or [])], caption_probs=None)


def test_each_query_list_ranks_the_images_of_its_own_folder(tmp_path):
    from entrep.config import load_config
    from entrep.data.release import load_test
    from entrep.inference import rank_test, track_galleries

    names = release_test_layout(tmp_path)
    test = load_test(tmp_path)
    assert test.galleries["i2i"] == sorted(names["Track2_Public"] + ["c0.png"])  # c0 is filed in Track 2 too
    assert test.galleries["t2i"] == sorted(names["Track3_Public"]) and test.galleries["cls"] == sorted(names["Track1_Public"])
    cfg = load_config(None, ["model.pretrained=", "infer.topk=20"])
    galleries = track_galleries(test, None)
    i2i, t2i = rank_test(synthetic_view(test), test, galleries, {"i2i": {}, "t2i": {}}, cfg)
    assert all(x["image"] in galleries["i2i"] for r in i2i.values() for x in r) and len(i2i["r0.png"]) == 5
    assert {x["image"] for x in t2i["a polyp"]} == set(names["Track3_Public"])
    # infer.gallery=FILE still restricts, in its order
    restricted = track_galleries(test, ["r3.png", "c1.png", "r1.png", "t0.png"], "g.txt")
    assert restricted == {"i2i": ["r3.png", "r1.png"], "t2i": ["t0.png"]}


def test_the_common_layout_is_one_gallery_as_before(tmp_path):
    from entrep.data.release import load_test

    for i in range(4):
        placeholder(tmp_path / f"imgs/{i}.png", i)
    (tmp_path / "i2i.csv").write_text("0.png\n")
    (tmp_path / "t2i.csv").write_text("x\n")
    (tmp_path / "queries").mkdir()
    (tmp_path / "queries/cls.csv").write_text("1.png\n")  # a folder without images: the whole root
    test = load_test(tmp_path)
    assert test.galleries == {t: [f"{i}.png" for i in range(4)] for t in ("cls", "i2i", "t2i")}


def test_an_i2i_query_whose_gallery_is_itself_is_refused_in_one_line(tmp_path):
    from entrep.config import load_config
    from entrep.data.release import load_test
    from entrep.inference import RunError, rank_test, track_galleries

    placeholder(tmp_path / "Track2/imgs/only.png", 1)
    placeholder(tmp_path / "Track3/imgs/t.png", 2)
    (tmp_path / "Track2/i2i.csv").write_text("only.png\n")
    (tmp_path / "Track3/t2i.csv").write_text("a caption\n")
    test = load_test(tmp_path)
    cfg = load_config(None, ["model.pretrained="])
    with pytest.raises(RunError, match=r"i2i query 'only.png': its gallery .*Track2.* holds nothing but the query"):
        rank_test(synthetic_view(test), test, track_galleries(test, None), {"i2i": {"kreciprocal": {
            "k1": 20, "k2": 6, "lam": 0.3}}, "t2i": {}}, cfg)
    (tmp_path / "Track2/i2i.csv").unlink()
    test = load_test(tmp_path)  # a one-image t2i gallery is answered, re-ranked or not
    for rerank in ({}, {"dba": {"k": 2}, "class_bonus": {"beta": 0.1}}):
        _, t2i = rank_test(synthetic_view(test), test, track_galleries(test, None), {"i2i": {}, "t2i": rerank}, cfg)
        assert [x["image"] for x in t2i["a caption"]] == ["t.png"]


def test_submit_validates_each_track_against_its_own_gallery(tmp_path):
    from entrep.commands.submit import main
    from entrep.submission import SubmissionError
    from test_submission import _predictions

    _predictions(tmp_path, {"i2i": ["q.png"]})
    meta = json.loads((tmp_path / "predictions/meta.json").read_text())
    meta["galleries"] = {"i2i": ["g1.png", "g2.png"]}  # g0.png, the top answer, is another track's image
    (tmp_path / "predictions/meta.json").write_text(json.dumps(meta))
    with pytest.raises(SubmissionError, match=r"retrieved \['g0.png'\] not in the gallery"):
        main(["--run", str(tmp_path)])


# ------------------------------------------------------------------ 6. the score command takes the challenge's zip

def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    return path


def test_score_takes_the_challenge_zip_and_a_truth_folder(tmp_path, capsys):
    from entrep.commands.score import main

    truth = tmp_path / "truth"
    truth.mkdir()
    (truth / "track1_cls.json").write_text(json.dumps({"a.png": 1, "b.png": 2}))
    (truth / "track2_i2i.json").write_text(json.dumps({"a.png": ["b.png"]}))
    (truth / "track3_t2i.json").write_text(json.dumps({"cap": ["a.png"]}))
    cls = _zip(tmp_path / "cls.zip", {"cls.json": b'{"a.png": 1, "b.png": 0}'})
    assert main(["--submission", str(cls), "--truth", str(truth), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cls"]["accuracy"] == 0.5
    every = _zip(tmp_path / "all.zip", {"cls.json": b'{"a.png": 1, "b.png": 2}', "i2i.json": b'{"a.png": "b.png"}',
                                        "t2i.json": b'{"cap": "b.png"}', "__MACOSX/._cls.json": b"\x00\x05\x16\x07"})
    assert main(["--submission", str(every), "--truth", str(truth), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["cls"]["accuracy"], r["i2i"]["mrr"], r["t2i"]["mrr"]) == (1.0, 1.0, 0.0)
    assert main(["--submission", str(every), "--truth", str(truth / "track2_i2i.json"), "--track", "i2i",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"i2i": r["i2i"]}


@pytest.mark.parametrize("submission, truth, message", [
    ({"cls.zip": b"PK\x03\x04 not a zip"}, None, "not a readable zip"),
    ({"x.zip": {"notes.txt": b"hi"}}, None, "holds no JSON file"),
    ({"x.zip": {"answers.json": b"{}", "more.json": b"{}"}}, None, "cannot tell its track from the name"),
    ({"x.zip": {"cls.json": b"\xff\xfe{}"}}, None, "x.zip:cls.json: not UTF-8 text"),
    ({"cls.json": b"\xff\xfe{}"}, None, "cls.json: not UTF-8 text"),  # was a UnicodeDecodeError traceback
    ({"cls.json": b"[" * 100_000}, None, "malformed JSON"),
    ({"x.zip": {"cls.json": b"{}", "i2i.json": b"{}"}}, "file", "give --truth a folder"),
    ({"x.zip": {"i2i.json": b"{}"}}, {"track1_cls.json": b"{}"}, "no truth file for i2i"),
    ({"x.zip": {"cls.json": b"{}"}}, {"cls.json": b"{}", "track1_cls.json": b"{}"}, "several truth files for cls"),
    ({"x.zip": {"cls.json": b"{}"}}, {"cls.json": b'{"a": "x"}'}, "not class indices"),
])
def test_score_refuses_every_malformed_zip_json_or_truth_in_one_line(tmp_path, capsys, submission, truth, message):
    from entrep.commands.score import main

    (name, content), = submission.items()
    sub = _zip(tmp_path / name, content) if isinstance(content, dict) else tmp_path / name
    if not isinstance(content, dict):
        sub.write_bytes(content)
    t = tmp_path / "truth"
    if truth == "file" or truth is None:
        t = tmp_path / "t.json"
        t.write_text('{"a.png": 1}')
    else:
        t.mkdir()
        for n, b in truth.items():
            (t / n).write_bytes(b)
    assert message in one_line(capsys, main, ["--submission", sub, "--truth", t])


def test_score_tables_keep_their_title_and_a_long_path_whole(tmp_path, capsys):
    from entrep.commands.score import main

    deep = tmp_path / ("a_rather_long_folder_name_" * 4) / "submission"
    deep.mkdir(parents=True)
    (deep / "cls.json").write_text('{"a.png": 1}')
    (tmp_path / "t.json").write_text('{"a.png": 1}')
    assert main(["--submission", str(deep / "cls.json"), "--truth", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "Track 1 classification" in out.splitlines()[0] and str(deep / "cls.json") in out


# ------------------------------------------------------------------ 9. friction

def test_macos_metadata_is_skipped_and_counted_everywhere_images_are_found(tmp_path):
    from entrep.commands.check import _findings
    from entrep.data.release import load_release, load_test
    from entrep.labels import ENTREP_CLASSES

    placeholder(tmp_path / "train/imgs/a.png", 1)
    placeholder(tmp_path / "train/imgs/b.png", 2)
    (tmp_path / "train/imgs/._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "train/cls.json").write_text('{"a.png": "throat", "b.png": "throat"}')
    (tmp_path / "train/i2i.json").write_text('{"a.png": "b.png", "b.png": "a.png"}')
    (tmp_path / "__MACOSX/train").mkdir(parents=True)
    (tmp_path / "__MACOSX/train/cls.json").write_text("not JSON")  # never read as annotations
    df, rep = load_release(tmp_path, ENTREP_CLASSES)
    assert sorted(df["image"]) == ["a.png", "b.png"] and not rep.bad_images and not rep.unannotated
    assert rep.macos_skipped == [str(tmp_path / "train/imgs/._a.png")]
    rows = {r[0]: r for r in _findings(df, rep)}
    pairs = rows["captioned images / i2i pairs (undirected: a->b and b->a are one pair)"]
    assert pairs[1] == "0 / 1" and pairs[2] == "from 2 i2i.json entries"
    test = tmp_path / "test"
    placeholder(test / "imgs/q.png", 3)
    (test / "imgs/._q.png").write_bytes(b"\x00\x05\x16\x07")
    (test / "__MACOSX/imgs").mkdir(parents=True)
    (test / "__MACOSX/imgs/._q.png").write_bytes(b"\x00\x05\x16\x07")
    (test / "__MACOSX/cls.csv").write_text("q.png\n")  # not a second cls.csv
    (test / "cls.csv").write_text("q.png\n")
    ts = load_test(test)
    assert list(ts.images) == ["q.png"] and ts.cls == ["q.png"]
    assert sorted(Path(p).relative_to(test).as_posix() for p in ts.skipped) == [
        "__MACOSX/cls.csv", "__MACOSX/imgs/._q.png", "imgs/._q.png"]


def test_every_format_pil_decodes_is_an_image_and_others_are_named(tmp_path):
    from PIL import Image, features

    from entrep.data.release import DataError, load_test

    placeholder(tmp_path / "imgs/a.png", 1)
    if features.check("webp"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "imgs/b.webp")
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs/c.gif")
    (tmp_path / "cls.csv").write_text("a.png\nc.gif\n" + ("b.webp\n" if features.check("webp") else ""))
    test = load_test(tmp_path)
    assert test.cls == ["a.png", "c.gif"] + (["b.webp"] if features.check("webp") else [])
    (tmp_path / "imgs/d.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (tmp_path / "cls.csv").write_text("d.heic\n")
    with pytest.raises(DataError, match=r"d.heic has the extension '.heic', which is not an image format the kit reads"):
        load_test(tmp_path)


def test_adapter_files_get_the_modes_of_the_kits_other_files(tmp_path):
    """peft's save_pretrained writes adapter_model.safetensors 0600; every file of a fold is 0644 (umask 022)."""
    from entrep.model.checkpoint import save_weights
    from test_faults import FakeModel

    save_weights(FakeModel(0), tmp_path / "fold0", {})
    umask = os.umask(0)
    os.umask(umask)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in (tmp_path / "fold0").rglob("*")}
    assert modes == {"fold0/adapter": 0o777 & ~umask, **{f: 0o666 & ~umask for f in (
        "fold0/adapter/adapter_config.json", "fold0/adapter/adapter_model.safetensors", "fold0/kit.safetensors",
        "fold0/meta.json")}}
    assert (tmp_path / "fold0").stat().st_mode & 0o777 == 0o777 & ~umask


def test_blend_members_are_logged_relative_to_the_current_folder(tmp_path, monkeypatch, caplog):
    import logging

    from entrep.ensemble import read_blend
    from entrep.config import load_config, save_config

    for name in ("a", "b"):
        save_config(load_config(None, ["model.pretrained="]), tmp_path / f"runs/{name}/config.yaml")
    (tmp_path / "runs/ab").mkdir()
    (tmp_path / "runs/ab/blend.json").write_text(json.dumps({"members": ["../a", "../b"]}))
    kept = {"i2i": {"rerank": {"kept": {}}}, "t2i": {"rerank": {"kept": {"dba": {"k": 2}}}}}
    (tmp_path / "runs/ab/tuned.json").write_text(json.dumps({"weights": {p: [1.0, 0.0] for p in ("cls", "i2i", "t2i")},
                                                            **kept}))
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="entrep")
    members, _ = read_blend(Path("runs/ab")).used()
    assert members == [(tmp_path / "runs/a").resolve()]
    assert "runs/b has weight 0 on every track" in caplog.text and str(tmp_path) not in caplog.text


def test_a_report_without_plots_leaves_no_earlier_plot_beside_it(tmp_path):
    """The report set is one unit: a report with no classification figures removes the earlier plots."""
    from entrep.io import atomic_files
    from entrep.figures import PLOTS, write_scored

    (tmp_path / PLOTS[0]).write_bytes(b"old plot")
    (tmp_path / PLOTS[1]).write_bytes(b"old plot")
    with atomic_files(tmp_path) as files:
        write_scored(files, {"classification": {}}, {"head_weight": 1.0}, {}, pd.DataFrame({"image": [], "label": []}),
                     [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failures.json", "oof.csv", "report.json", "tuned.json"]


def test_hand_edited_kit_files_are_one_line(tmp_path, capsys):
    """tuned.json, meta.json of predictions: a field of another type is one line naming the file."""
    from entrep.commands.submit import main
    from entrep.config import load_config
    from conftest import inference_settings
    from entrep.io import kit_file
    from test_submission import _predictions

    cfg = load_config(None, ["model.pretrained="])
    for tuned in ({"head_weight": "0.5"}, {"tta_flip": "yes"}, {"i2i": {"alpha": 2, "rerank": {}}},
                  {"i2i": {"alpha": 0.1, "rerank": {"kept": {"mystery": {}}}}}, {"t2i": [1]},
                  {"i2i": {"alpha": 0.1, "rerank": {"kept": {"dba": {"k": "two"}}}}}):
        with pytest.raises(EntrepError, match="tuned.json: unexpected content"):
            with kit_file(tmp_path / "tuned.json"):
                inference_settings(cfg, tuned, set())
    _predictions(tmp_path, {"cls": ["c.png"]})
    (tmp_path / "predictions/meta.json").write_text('{"topk": 1, "queries": {"cls": ["c.png"]}}')
    assert "meta.json: unexpected content (KeyError: 'labels')" in one_line(capsys, main, ["--run", tmp_path])
    (tmp_path / "predictions/meta.json").write_text('{"topk": 1, "queries"')
    assert "meta.json: unreadable" in one_line(capsys, main, ["--run", tmp_path])


# ------------------------------------------------------------------ end to end on a trained run (slow tier)

def _copy_run(trained, dest: Path) -> Path:
    shutil.copytree(trained, dest, ignore=shutil.ignore_patterns(".lock*", "predictions", "submission"))
    return dest


@pytest.mark.slow
def test_infer_on_a_fold_half_present_names_the_file(trained_demo_run, demo, tmp_path, capsys):
    """rm -rf fold1/adapter: infer used to log 'ensembling fold0, fold1' and run fold 1 with fold 0's adapter."""
    from entrep.commands.infer import main

    run = _copy_run(trained_demo_run, tmp_path / "a")
    shutil.rmtree(run / "fold1/adapter")
    line = one_line(capsys, main, ["--run", run, "--data", demo / "test"])
    assert f"{run}/fold1/adapter/adapter_config.json: missing" in line and "train.folds=[1]" in line
    assert not (run / "predictions").exists()
    mode = (trained_demo_run / "fold0/adapter/adapter_model.safetensors").stat().st_mode & 0o777
    assert mode == (trained_demo_run / "fold0/kit.safetensors").stat().st_mode & 0o777  # not peft's 0600


@pytest.mark.slow
def test_read_only_run_full_disk_and_a_one_image_test_folder(trained_demo_run, demo, tmp_path, capsys, monkeypatch):
    """A read-only run (every write under it fails with EROFS, as on a Kaggle input dataset): infer --out
    and submit --predictions/--out work and the run is untouched; without --out, one line before any
    fold is embedded. Then a full disk during a second infer leaves the first predictions whole, and a
    one-image test folder is answered where it can be and refused in one line where it cannot."""
    from entrep.commands.infer import main as infer
    from entrep.commands.submit import main as submit
    from test_faults import Faults, state

    ro = tmp_path / "ro"
    run = _copy_run(trained_demo_run, ro / "a")
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text("\n".join(f"output_dir: {ro}" if line.startswith("output_dir:") else line
                                               for line in config.splitlines()) + "\n")  # its cache: read-only too
    before = state(ro)
    faults = Faults(monkeypatch)
    faults.arm(ro, fail_at=1, err=errno.EROFS, every=True)
    assert run_main(infer, ["--run", str(run), "--data", str(demo / "test"), "--out", str(tmp_path / "pred")]) == 0
    out = capsys.readouterr().out
    assert out.count("is not writable (Read-only file system): decoding") == 1 and "embedded" in out
    assert run_main(submit, ["--run", str(run), "--predictions", str(tmp_path / "pred"), "--out",
                             str(tmp_path / "sub")]) == 0
    line = one_line(capsys, infer, ["--run", run, "--data", demo / "test"])
    assert f"cannot write {run}/predictions: Read-only file system" in line
    faults.off()
    assert state(ro) == before and not any(p.name.startswith(".") for p in run.iterdir())
    # a full disk at the second infer (another head weight): the first predictions stay whole
    first = state(tmp_path / "pred")
    faults = Faults(monkeypatch)
    faults.arm(tmp_path / "pred", fail_at=3)
    line = one_line(capsys, infer, ["--run", run, "--data", demo / "test", "--out", tmp_path / "pred",
                                    "infer.head_weight=0.9"])
    faults.off()
    assert "No space left on device" in line and state(tmp_path / "pred") == first
    # a test folder of one image
    one = tmp_path / "one"
    name = sorted((demo / "test/imgs").iterdir())[0].name
    shutil.copytree(demo / "test/imgs", one / "imgs", ignore=lambda d, files: [f for f in files if f != name])
    (one / "i2i.csv").write_text(f"{name}\n")
    assert "holds nothing but the query itself" in one_line(capsys, infer, ["--run", run, "--data", one, "--out",
                                                                              tmp_path / "p1"])
    (one / "i2i.csv").unlink()
    (one / "cls.csv").write_text(f"{name}\n")
    (one / "t2i.csv").write_text("a polyp\n")
    assert run_main(infer, ["--run", str(run), "--data", str(one), "--out", str(tmp_path / "p1"),
                            "rerank.methods=[dba,class_bonus]"]) == 0
    assert run_main(submit, ["--predictions", str(tmp_path / "p1"), "--out", str(tmp_path / "s1")]) == 0
    assert json.loads((tmp_path / "s1/t2i.json").read_text()) == {"a polyp": name}


@pytest.mark.slow
def test_infer_on_the_release_per_track_layout(trained_demo_run, demo, tmp_path, capsys):
    """Track1_Public/{imgs,cls.csv}, Track2_Public/{imgs,i2i.csv}: i2i answers come from Track 2 only
    (one merged gallery gave Track 1 images as answers), recorded per track in predictions/meta.json."""
    from entrep.commands.infer import main as infer
    from entrep.commands.submit import main as submit

    root = tmp_path / "PublicData"
    queries = (demo / "test/i2i.csv").read_text().split()
    others = [p for p in sorted((demo / "test/imgs").iterdir()) if p.name not in queries]
    for q in queries:
        (root / "Track2_Public/imgs").mkdir(parents=True, exist_ok=True)
        shutil.copy(demo / "test/imgs" / q, root / "Track2_Public/imgs" / q)
    for p in others:
        (root / "Track1_Public/imgs").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / "Track1_Public/imgs" / p.name)
    (root / "Track1_Public/cls.csv").write_text("".join(f"{p.name}\n" for p in others))
    shutil.copy(demo / "test/i2i.csv", root / "Track2_Public/i2i.csv")
    shutil.copy(demo / "test/t2i.csv", root / "t2i.csv")
    run = _copy_run(trained_demo_run, tmp_path / "a")
    assert run_main(infer, ["--run", str(run), "--data", str(root), "infer.topk=50"]) == 0
    meta = json.loads((run / "predictions/meta.json").read_text())
    assert sorted(meta["galleries"]["i2i"]) == sorted(queries) and len(meta["galleries"]["t2i"]) == len(
        queries) + len(others)
    i2i = json.loads((run / "predictions/i2i.json").read_text())
    assert all(x["image"] in queries for r in i2i.values() for x in r) and all(len(r) == len(queries) - 1
                                                                              for r in i2i.values())
    assert run_main(submit, ["--run", str(run)]) == 0
    capsys.readouterr()


def test_a_folder_or_a_missing_file_where_a_query_list_is_expected_is_one_line(tmp_path):
    from entrep.data.release import DataError, read_query_lines

    (tmp_path / "gallery").mkdir()
    with pytest.raises(DataError, match="gallery is a folder; give the file that lists one item per line"):
        read_query_lines(tmp_path / "gallery")
    with pytest.raises(DataError, match="nope.txt: no such file"):
        read_query_lines(tmp_path / "nope.txt")


def test_infer_refuses_an_out_folder_holding_other_files_before_any_work(tmp_path, capsys):
    """It was refused only after every image had been embedded: here the run does not even exist, and the
    --out folder is what the one line names."""
    from entrep.commands.infer import main

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    line = one_line(capsys, main, ["--run", tmp_path / "no_run", "--data", tmp_path, "--out", tmp_path / "mine"])
    assert "holds files that are not this output's (notes.txt)" in line


def test_a_blend_is_never_written_among_a_runs_own_files(tmp_path, capsys):
    """--output-dir RUN --name fold0 wrote a blend into the run's fold folder."""
    from entrep.commands.blend import main

    run = tmp_path / "runs/a"
    (run / "fold0").mkdir(parents=True)
    (run / "config.yaml").write_text("name: a\n")
    line = one_line(capsys, main, ["--runs", run, tmp_path / "runs/b", "--output-dir", run, "--name", "fold0"])
    assert f"--output-dir {run} is a run (or blend) directory" in line and f"--output-dir {tmp_path / 'runs'}" in line
    assert sorted(p.name for p in (run / "fold0").iterdir()) == []


def test_a_typo_in_pseudo_data_leaves_no_config_that_would_refuse_the_fixed_retry(tmp_path, demo, capsys):
    """The first call failed in fold 0's pseudo-labels after config.yaml was claimed: the retry with the fix
    was refused as 'trained with other values'. Now nothing of the run is written before the check."""
    from entrep.commands.train import main

    src = tmp_path / "runs/src"
    src.mkdir(parents=True)
    (src / "config.yaml").write_text("name: src\n")
    (src / "folds.csv").write_text("image,fold\n")
    line = one_line(capsys, main, ["--config", "configs/demo.yaml", "--data", demo, "--name", "p",
                                   f"output_dir={tmp_path / 'runs'}", f"train.pseudo_from={src}",
                                   f"train.pseudo_data={tmp_path / 'tset'}"])
    assert f"train.pseudo_data={tmp_path / 'tset'}: test folder not found" in line
    assert not (tmp_path / "runs/p/config.yaml").exists()
