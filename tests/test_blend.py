"""Blending runs out of fold: the similarity mix, ensemble selection, cross-fitted figures, the fold
check, and shared folds (the end-to-end blend -> infer -> submit is in test_e2e.py)."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_report import NAMES, signal_free, synthetic_oof

from entrep.ensemble import BlendError, Member, check_same_folds, choose, crossfit_blend, mix, select
from entrep.config import load_config
from entrep.data.folds import FoldError, load_or_make_folds
from entrep.oof import RETRIEVAL_TRACKS
from entrep.figures import crossfit_figures
from entrep.settings import Settings
from entrep.tuning import tune


@pytest.fixture()
def cfg():
    return load_config(None, ["model.pretrained=", "infer.tta_flip=false", "rerank.min_gain=0.0"])


def member(oof, table, cfg, name="A") -> Member:
    report, _ = crossfit_figures(oof, table, NAMES, cfg)
    return Member(Path(name), cfg, oof, report, Settings.from_tuning(tune(oof, table, NAMES, cfg)))


def test_the_weighted_concatenation_mixes_cosine_similarities():
    rng = np.random.default_rng(0)
    views = []
    for d in (8, 5):  # members may have different embedding sizes (another backbone)
        oof, _ = synthetic_oof(seed=d)
        v = oof[0].view(1.0, False)
        g = rng.normal(size=(len(v.images), d)).astype(np.float32)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        cap = rng.normal(size=(len(v.captions), d)).astype(np.float32)
        views.append(replace(v, ret={"i2i": g, "t2i": g}, caption_emb=cap))
    w = {"cls": [0.25, 0.75], "i2i": [0.3, 0.7], "t2i": [0.5, 0.5]}
    m = mix(views, w)
    cos = [v.ret["i2i"] @ v.ret["i2i"].T for v in views]
    np.testing.assert_allclose(m.ret["i2i"] @ m.ret["i2i"].T, 0.3 * cos[0] + 0.7 * cos[1], atol=1e-5)
    np.testing.assert_allclose(m.probs, 0.25 * views[0].probs + 0.75 * views[1].probs, atol=1e-6)
    assert m.ret["i2i"].shape[1] == 8 + 5 and np.allclose(np.linalg.norm(m.ret["i2i"], axis=1), 1, atol=1e-5)
    assert m.caption_emb.shape[1] == 8 + 5  # the t2i queries live in the t2i gallery's space
    only = mix(views, {"cls": [1.0, 0.0], "i2i": [1.0, 0.0], "t2i": [1.0, 0.0]})
    np.testing.assert_allclose(only.ret["i2i"], views[0].ret["i2i"], atol=1e-6)  # a zero weight drops the member


def test_ensemble_selection_starts_from_the_best_member_and_keeps_the_best_bag():
    target = np.array([0.75, 0.25, 0.0])
    w, trace = select(lambda x: -np.abs(x - target).sum(), 3, rounds=8)
    assert w == [0.75, 0.25, 0.0]
    assert trace[0]["added"] == 0 and len(trace) == 8
    flat, _ = select(lambda x: 1.0, 3, rounds=5)  # a plateau keeps the first, smallest bag
    assert flat == [1.0, 0.0, 0.0]


def test_a_run_blended_with_itself_reports_exactly_its_own_figures(cfg):
    oof, table = synthetic_oof()
    a = member(oof, table, cfg)
    report, tuned, _ = crossfit_blend([a, a], table, NAMES, rounds=4)
    assert report["classification"]["accuracy"] == pytest.approx(a.report["classification"]["accuracy"])
    assert report["classification"]["f1_macro"] == pytest.approx(a.report["classification"]["f1_macro"])
    for t in RETRIEVAL_TRACKS:
        assert report[t]["mrr"] == pytest.approx(a.report[t]["mrr"], abs=1e-6)
    assert report["members"]["A"]["i2i"]["mrr"] == a.report["i2i"]["mrr"]


def test_each_fold_is_scored_with_weights_chosen_on_the_other_folds(cfg):
    oof, table = synthetic_oof(seed=1)
    a, b = member(oof, table, cfg, "A"), member(signal_free(oof), table, cfg, "B")
    report, tuned, scored = crossfit_blend([a, b], table, NAMES, rounds=6)
    for k in oof:
        mv = [a.views(k), b.views(k)]  # member settings tuned without fold k
        ch = choose(mv, [j for j in oof if j != k], table, NAMES, cfg.rerank, 6)
        assert scored[k].settings["weights"] == ch["weights"]
        assert scored[k].view.probs.tolist() == mix([v[k] for v in mv], ch["weights"]).probs.tolist()
    # the signal-free member gets no classification weight, and the blend keeps the real member's figures
    assert tuned["weights"]["cls"] == [1.0, 0.0]
    assert report["classification"]["accuracy"] >= a.report["classification"]["accuracy"] - 1e-9
    assert set(report["members"]) == {"A", "B"} and set(report["how"]) >= {"weights", "members", "tuned"}


def write_folds(run: Path, folds: dict) -> Member:
    run.mkdir(parents=True)
    pd.DataFrame({"image": list(folds), "fold": list(folds.values())}).to_csv(run / "folds.csv", index=False)
    return Member(run, load_config(None, ["model.pretrained="]), {}, {}, Settings())


def test_runs_whose_folds_differ_are_refused_naming_the_first_image(tmp_path):
    a = write_folds(tmp_path / "A", {"x.png": 0, "y.png": 1, "z.png": 0})
    same = write_folds(tmp_path / "S", {"z.png": 0, "x.png": 0, "y.png": 1})  # the same folds in another order
    assert list(check_same_folds([a, same])["image"]) == ["x.png", "y.png", "z.png"]
    b = write_folds(tmp_path / "B", {"x.png": 0, "y.png": 0, "z.png": 1})
    with pytest.raises(BlendError, match=r"first difference y\.png .*fold 1.*fold 0.*cv\.folds_from"):
        check_same_folds([a, b])
    c = write_folds(tmp_path / "C", {"x.png": 0, "y.png": 1})
    with pytest.raises(BlendError, match=r"first difference z\.png .*absent"):
        check_same_folds([a, c])


def test_folds_from_copies_another_runs_folds_and_checks_them(demo, tmp_path):
    from entrep.data.release import load_release
    from entrep.labels import ENTREP_CLASSES

    demo_table, _ = load_release(demo, ENTREP_CLASSES, False)
    src = tmp_path / "A" / "folds.csv"
    made = load_or_make_folds(src, demo_table, 3, seed=1)
    got = load_or_make_folds(tmp_path / "B" / "folds.csv", demo_table, 3, seed=99, source=tmp_path / "A")
    assert got["fold"].tolist() == made["fold"].tolist()  # seed 99 would have given other folds
    assert (tmp_path / "B" / "folds.csv").read_bytes() == src.read_bytes()
    with pytest.raises(FoldError, match="3 folds but cv.n_splits=4"):
        load_or_make_folds(tmp_path / "C" / "folds.csv", demo_table, 4, seed=1, source=src)
    assert not (tmp_path / "C" / "folds.csv").exists()
    with pytest.raises(FoldError, match="no folds.csv there"):
        load_or_make_folds(tmp_path / "D" / "folds.csv", demo_table, 3, seed=1, source=tmp_path / "nowhere")


def test_fold_signatures_do_not_depend_on_the_models_input_size(demo):
    """Runs with other backbones (other input sizes) must get the same folds from the same data: the
    near-duplicate pass decodes the files itself, at one fixed size."""
    from entrep.data import near_dup

    paths = sorted(str(p) for p in (Path(demo) / "train" / "imgs").glob("*.png"))[:40]
    a, b = near_dup.file_signatures(paths), near_dup.file_signatures(paths)
    assert len(a) == 40
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in near_dup.Signatures.__dataclass_fields__)
    assert near_dup.decode_frames(paths[:2]).shape == (2, near_dup.DECODE, near_dup.DECODE, 3)


def test_a_member_never_selected_is_not_embedded_at_inference():
    from entrep.ensemble import Blend

    b = Blend([Path("a"), Path("b"), Path("c")], {"cls": [0.5, 0.0, 0.5], "i2i": [1.0, 0.0, 0.0],
                                                  "t2i": [0.2, 0.0, 0.8]}, {"i2i": {}, "t2i": {}})
    members, weights = b.used()
    assert members == [Path("a"), Path("c")]
    assert weights == {"cls": [0.5, 0.5], "i2i": [1.0, 0.0], "t2i": [0.2, 0.8]}


def test_weights_chosen_on_the_scored_folds_would_flatter_a_blend_of_noise(cfg):
    """Six members without any signal: weights chosen in-sample find a lucky mix, the cross-fitted
    figure stays at chance. The blend reports the latter."""
    oof, table = synthetic_oof(seed=2, per_fold=30)
    members = [member(signal_free(oof, seed=s), table, cfg, f"n{s}") for s in range(6)]
    report, tuned, _ = crossfit_blend(members, table, NAMES, rounds=10)
    in_sample_views = {k: mix([m.views(None)[k] for m in members], tuned["weights"]) for k in oof}
    from entrep.oof import pooled_classification

    in_sample = pooled_classification(in_sample_views, table, NAMES)["accuracy"]
    crossfit_acc = report["classification"]["accuracy"]
    assert in_sample > crossfit_acc + 0.03, (in_sample, crossfit_acc)
    assert abs(crossfit_acc - 1 / 3) < 0.12  # chance, 90 images


def test_a_release_whose_labels_changed_is_refused_not_scored_beside_the_old_figures(cfg, tmp_path):
    """`blend --data` with 15 labels changed would score the blend on new labels beside members scored on
    old ones; the members' run.json says what they were trained on."""
    from entrep.ensemble import blend
    from entrep.data.identity import data_identity
    from entrep.io import atomic_write_json

    oof, table = synthetic_oof()
    table = table.assign(sha1=[f"{i:040x}" for i in range(len(table))])
    members = [member(oof, table, cfg, str(tmp_path / name)) for name in ("A", "B")]
    for m in members:
        atomic_write_json(m.run / "run.json", {"data": data_identity(table), "batch": {}})
    folds = pd.DataFrame({"image": table["image"], "fold": [int(n[1]) for n in table["image"]]})
    changed = table.copy()
    changed.loc[:14, "label"] = [NAMES[(NAMES.index(x) + 1) % 3] for x in changed.loc[:14, "label"]]
    with pytest.raises(BlendError, match="differs from what .* was trained and scored on .*15 images' labels changed"):
        blend(members, folds, tmp_path / "mix", changed, NAMES, rounds=2)
    assert not (tmp_path / "mix").exists()
