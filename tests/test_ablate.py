"""The ablation ladder on the demo data: table shape, one switch per rung, reuse on a re-run."""
import pandas as pd
import pytest

from entrep.commands.ablate import default_ladder, inference_only, main
from entrep.config import flat_dict, load_config, parse_override


def config_diff(a, b) -> set[str]:
    """Dotted keys whose values differ between two saved run configs (the name aside)."""
    import yaml

    fa, fb = (flat_dict(yaml.safe_load(p.read_text())) for p in (a, b))
    return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k) and k != "name"}


@pytest.mark.slow
def test_ladder_runs_and_each_rung_flips_exactly_its_switch(demo, tmp_path):
    args = ["--config", "configs/demo.yaml", "--data", str(demo), "--name", "abl", f"output_dir={tmp_path}",
            "cv.n_splits=2", "train.epochs=1"]
    assert main(args) == 0
    root = tmp_path / "abl_ablation"
    table = pd.read_csv(root / "ablation.csv")
    assert table["rung"].tolist() == ["1_baseline", "2_lora", "3_fusion", "4_prompts_joint_loss", "5_slerp_train",
                                      "6_slerp_retrieval", "7_flip_tta", "8_rerank"]
    assert list(table.columns) == ["rung", "accuracy", "f1_macro", "i2i_R@1", "i2i_MRR", "t2i_R@1", "t2i_MRR",
                                   "trainable_params", "wall_s", "reused_folds_of"]
    assert table[["accuracy", "f1_macro", "i2i_MRR"]].notna().all().all()
    assert (root / "ablation.md").read_text().count("\n") == 10 and (root / "ablation.png").is_file()
    _, rungs = default_ladder(load_config("configs/demo.yaml"))
    names = list(rungs)
    for prev, cur in zip(names, names[1:]):
        changed = config_diff(root / prev / "config.yaml", root / cur / "config.yaml")
        intended = {parse_override(o)[0] for o in rungs[cur]}
        # a switch may restore a value the base already had (e.g. a zero loss weight): only intended keys move
        assert changed and changed <= intended, (cur, changed, intended)
    # LoRA replaces two unfrozen blocks: far fewer trainable parameters
    assert table.loc[1, "trainable_params"] < table.loc[0, "trainable_params"]
    assert table["reused_folds_of"].fillna("").tolist()[5:] == ["5_slerp_train", "6_slerp_retrieval", "7_flip_tta"]
    for rung in names:
        assert (root / rung / "folds.csv").read_bytes() == (root / names[0] / "folds.csv").read_bytes()
    before = {r: (root / r / "rung.json").read_text() for r in names}
    assert main(args) == 0  # finished rungs are reused
    assert {r: (root / r / "rung.json").read_text() for r in names} == before
    # another setting under the same --name: no rung's results may be reused
    assert main(args + ["model.lora.rank=4"]) == 0
    after = {r: (root / r / "rung.json").read_text() for r in names}
    assert all(after[r] != before[r] for r in names)
    assert "rank: 4" in (root / "2_lora/config.yaml").read_text()
    assert pd.read_csv(root / "ablation.csv").loc[1, "trainable_params"] < table.loc[1, "trainable_params"]


def test_inference_only_switches():
    assert inference_only(["infer.tta_flip=true"]) and inference_only(["rerank.methods=[qe]"])
    assert inference_only(["model.slerp.alpha_grid=[0, 0.5]"])  # tuning only: the folds are reused
    assert not inference_only(["model.slerp.train=true"]) and not inference_only([])


def test_the_recipe_rungs_each_add_one_switch_and_pseudo_labels_learn_from_the_rung_before():
    from entrep.commands.ablate import recipe_rungs

    rungs = recipe_rungs("runs/x_ablation", "data/test")
    assert list(rungs) == ["9_ema", "10_mixup_cutmix", "11_layer_decay", "12_input_size", "13_wise_ft", "14_memory",
                           "15_pseudo_labels"]
    # WiSE-FT and the memory are scoring settings: they re-score the folds of the last trained rung, which
    # is the one the pseudo-labels come from
    assert [inference_only(o) for o in rungs.values()] == [False] * 4 + [True] * 2 + [False]
    assert rungs["15_pseudo_labels"][0] == "train.pseudo_from=runs/x_ablation/12_input_size"
    for overrides in rungs.values():  # every switch is a real config key with a valid value
        load_config(None, overrides)
    assert "15_pseudo_labels" not in recipe_rungs("runs/x_ablation")
    # the input-size rung is 1.5x the model's own side, whatever it is
    assert rungs["12_input_size"] == ["model.image_size=96"]
    assert recipe_rungs("r", side=224)["12_input_size"] == ["model.image_size=336"]
    assert recipe_rungs("r", side=336)["12_input_size"] == ["model.image_size=504"]


def test_the_photo_release_is_a_release_the_kit_reads(tmp_path):
    pytest.importorskip("skimage")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from photo_release import CLASSES, make

    from entrep.data.release import load_release, load_test

    out = make(tmp_path / "p", cases=12, test_cases=4, size=48)
    table, report = load_release(out, CLASSES)
    assert len(table) >= 12 and set(table["label"]) <= set(CLASSES) and table["partners"].map(len).sum() > 0
    assert table["captions"].map(bool).any() and not report.missing
    assert load_test(out / "test").t2i
    assert load_config(Path(__file__).parents[1] / "bench/photos.yaml").labels.names == CLASSES


def test_over_seeds_gives_each_rung_its_mean_and_spread():
    from entrep.commands.ablate import FIGURES, over_seeds

    def ladder(shift):
        return pd.DataFrame({"rung": ["1_a", "2_b"], **{f: [0.5 + shift, 0.6 + shift] for f in FIGURES},
                             "trainable_params": [10, 20], "wall_s": [1.0, 2.0], "reused_folds_of": ["", "1_a"]})

    t = over_seeds([ladder(0.0), ladder(0.1)]).set_index("rung")
    assert list(t.index) == ["1_a", "2_b"] and (t["seeds"] == 2).all()
    assert t.loc["2_b", "f1_macro"] == pytest.approx(0.65) and t.loc["2_b", "f1_macro_std"] == pytest.approx(0.0707, abs=1e-4)
    assert t.loc["1_a", "wall_s"] == 2.0 and t.loc["2_b", "trainable_params"] == 20
    gap = ladder(0.1)
    gap.loc[1, "t2i_MRR"] = float("nan")  # one seed without the figure: no mean over "2 seeds" of one
    t = over_seeds([ladder(0.0), gap]).set_index("rung")
    assert pd.isna(t.loc["2_b", "t2i_MRR"]) and t.loc["1_a", "t2i_MRR"] == pytest.approx(0.55)


@pytest.mark.slow
def test_the_ladder_over_seeds_trains_each_seed_on_the_same_folds_and_reports_the_spread(demo, tmp_path):
    cfg = tmp_path / "ladder.yaml"
    cfg.write_text("ablation:\n  base: [infer.tta_flip=false]\n  rungs:\n    1_base: []\n    2_flip: [infer.tta_flip=true]\n")
    args = ["--config", str(cfg), "--data", str(demo), "--name", "s", f"output_dir={tmp_path}", "--seeds", "2",
            "cv.n_splits=2", "train.epochs=1", "model.name=entrep-tiny", "model.pretrained=", "model.image_size=0"]
    assert main(args) == 0
    root = tmp_path / "s_ablation"
    table = pd.read_csv(root / "ablation.csv")
    assert table["rung"].tolist() == ["1_base", "2_flip"] and (table["seeds"] == 2).all()
    assert {"f1_macro", "f1_macro_std", "i2i_MRR_std"} <= set(table.columns) and table["f1_macro_std"].notna().all()
    for s in (0, 1):
        assert (root / f"seed{s}/1_base/folds.csv").read_bytes() == (root / "seed0/1_base/folds.csv").read_bytes()
    assert "seed: 43" in (root / "seed1/1_base/config.yaml").read_text()
    assert json_of(root / "seed1/2_flip/rung.json")["reused_folds_of"] == "1_base"


def json_of(path):
    import json

    return json.loads(path.read_text())
