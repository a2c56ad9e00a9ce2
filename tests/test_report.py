"""Out-of-fold figures: cross-fitted tuning (nothing reported is chosen on the data it scores),
per-track settings, the inference settings infer.py applies, and the optimiser's decay groups."""
import numpy as np
import pandas as pd
import pytest
import torch

from entrep.config import load_config
from entrep.embedding import Embedded
from entrep.oof import RETRIEVAL_TRACKS, FoldOOF, pooled_classification, pooled_retrieval, track_rankings
from entrep.figures import crossfit_figures
from entrep.tuning import RERANK_OFFERED, tune

NAMES = ["a", "b", "c"]


def synthetic_oof(seed=0, folds=3, per_fold=18):
    """Folds of images near their class centre, i2i pairs within a fold, one caption per class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 16))
    class_emb = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    rows, oof = [], {}
    for k in range(folds):
        images, embs, heads, prompts = [], [], [], []
        for i in range(per_fold):
            y = i % 3
            name = f"f{k}_{i}.png"
            e = centres[y] + rng.normal(scale=1.2, size=16)
            embs.append(e / np.linalg.norm(e))
            logits = rng.normal(size=3) + 1.5 * np.eye(3)[y] * rng.uniform(0, 2)
            heads.append(np.exp(logits) / np.exp(logits).sum())
            p = np.exp(3 * embs[-1] @ class_emb.T)
            prompts.append(p / p.sum())
            partner = f"f{k}_{i ^ 1}.png" if i < per_fold - (per_fold % 2) else None
            rows.append({"image": name, "y": y, "label": NAMES[y], "partners": [partner] if partner else [],
                         "captions": [f"finding {y}"] if i % 2 == 0 else []})
            images.append(name)
        e = Embedded([np.array(heads, np.float32)], [np.array(prompts, np.float32)], np.array(embs, np.float32),
                     class_emb.astype(np.float32))
        cap = np.stack([class_emb[y] + rng.normal(scale=0.8, size=16) for y in range(3)])
        cap = (cap / np.linalg.norm(cap, axis=1, keepdims=True)).astype(np.float32)
        oof[k] = FoldOOF(images=images, embedded=e, captions=[f"finding {y}" for y in range(3)], caption_emb=cap)
    return oof, pd.DataFrame(rows)


@pytest.fixture()
def cfg():
    return load_config(None, ["model.pretrained=", "infer.tta_flip=false", "rerank.min_gain=0.0"])


def test_each_fold_is_scored_with_settings_tuned_on_the_other_folds(cfg):
    oof, table = synthetic_oof()
    report, scored = crossfit_figures(oof, table, NAMES, cfg)
    others = {k: tune({j: f for j, f in oof.items() if j != k}, table, NAMES, cfg) for k in oof}
    for k in oof:
        settings = scored[k].settings
        assert settings["head_weight"] == others[k]["head_weight"]
        for track in RETRIEVAL_TRACKS:
            assert settings[track]["alpha"] == others[k][track]["alpha"]
            assert settings[track]["rerank"] == list(others[k][track]["rerank"]["kept"])
    # the pooled figures are exactly those of each fold scored with its own cross-fitted settings
    y_of = dict(zip(table["image"], table["y"]))
    y, pred = [], []
    for k, f in oof.items():
        y += [y_of[n] for n in f.images]
        pred += list(f.embedded.probs(others[k]["head_weight"], False).argmax(1))
    assert report["classification"]["accuracy"] == pytest.approx(np.mean(np.array(y) == np.array(pred)))
    rk, rel = [], []
    for k, fold in oof.items():
        view = fold.view(others[k]["head_weight"], False, others[k]["i2i"]["alpha"])
        r, s, *_ = track_rankings(view, table, "i2i", others[k]["i2i"]["rerank"]["kept"])
        rk += r
        rel += s
    mrr = np.mean([1 / (r.index(next(iter(s))) + 1) if next(iter(s)) in r else 0 for r, s in zip(rk, rel)])
    assert report["i2i"]["mrr"] == pytest.approx(mrr)
    assert set(report["how"]) >= {"classification", "i2i", "t2i", "folds", "tuned"}
    assert "cross-fitted" in report["how"]["classification"] and "other folds" in report["how"]["i2i"]


def with_scales_and_memory(oof, table, seed=5, scales=(0.0, 0.5)):
    """The folds with outputs at other WiSE scales (each scale its own perturbation of the trained outputs) and
    a known-pair memory: every image of every fold embedded by fold k's model, fold k's own flagged held out."""
    from dataclasses import replace

    from entrep.memory import Memory, table_pairs

    rng = np.random.default_rng(seed)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def perturbed(e, scale):
        noise = 1.5 * (1 - scale)
        head = [np.abs(h + rng.normal(scale=0.2 * noise, size=h.shape)).astype(np.float32) for h in e.head]
        head = [h / h.sum(1, keepdims=True) for h in head]
        return Embedded(head, e.prompt, unit(e.emb + rng.normal(scale=noise, size=e.emb.shape)), e.class_emb)

    images = [n for f in oof.values() for n in f.images]
    out = {}
    for k, f in oof.items():
        scaled = {s: (perturbed(f.embedded, s), unit(f.caption_emb + rng.normal(scale=0.5, size=f.caption_emb.shape)))
                  for s in scales}
        embedded = {s: Embedded([np.concatenate([g.embedded.head[0] for g in oof.values()])],
                                [np.concatenate([g.embedded.prompt[0] for g in oof.values()])],
                                unit(np.concatenate([g.embedded.emb for g in oof.values()])
                                     + rng.normal(scale=0.3, size=(len(images), f.embedded.emb.shape[1]))),
                                f.embedded.class_emb) for s in (1.0, *scales)}
        pair_image, pair_caption = table_pairs(images, table)
        memory = Memory(images, np.array([n in set(f.images) for n in images]), embedded, pair_image, pair_caption)
        out[k] = replace(f, scaled=scaled, memory=memory)
    return out


def test_wise_scales_and_memory_weight_of_each_fold_are_chosen_without_it():
    oof, table = synthetic_oof(seed=3)
    oof = with_scales_and_memory(oof, table)
    cfg = load_config(None, ["model.pretrained=", "infer.tta_flip=false", "rerank.min_gain=0.0",
                             "model.slerp.alpha_grid=[0.0,0.2]", "rerank.methods=[dba,class_bonus]",
                             "infer.wise_grid=[0.0,0.5,1.0]", "infer.memory_weight=[0.0,0.5,1.0]"])
    report, scored = crossfit_figures(oof, table, NAMES, cfg)
    chosen = set()
    for k in oof:
        others = {j: f for j, f in oof.items() if j != k}
        t = tune(others, table, NAMES, cfg)
        s = scored[k].settings
        assert s["wise"] == t["wise"] and s["memory_weight"] == t["memory_weight"]
        assert set(s["wise"]) == {"cls", "i2i", "t2i"}
        chosen |= {s["memory_weight"], *s["wise"].values()}
        # fold k is scored under exactly those settings, its memory the other folds' carriers only
        view = oof[k].view(t["head_weight"], False, {tr: t[tr]["alpha"] for tr in RETRIEVAL_TRACKS}, t["wise"],
                           t["memory_weight"])
        assert np.array_equal(scored[k].view.caption_emb, view.caption_emb)
        assert all(np.array_equal(scored[k].view.ret[tr], view.ret[tr]) for tr in RETRIEVAL_TRACKS)
        assert np.array_equal(scored[k].view.probs, view.probs)
        # a choice on fold k's own predictions would be another function of them: the grid it scored is recorded
        assert set(t["t2i"]["memory_grid_mrr"]) == {"0.0", "0.5", "1.0"} and set(t["i2i"]["wise_grid_mrr"]) == {
            "0.0", "0.5", "1.0"}
    assert chosen - {1.0, 0.0}, "the synthetic case should make some other choice than the defaults"
    full = tune(oof, table, NAMES, cfg)
    assert set(full["wise"]) == {"cls", "i2i", "t2i"} and "memory_weight" in full


def test_default_grids_leave_the_figures_as_they_were(cfg):
    """infer.wise_grid=[1.0] and infer.memory_weight=[0.0] (the defaults): files with other scales and a memory
    score exactly as the plain files do."""
    oof, table = synthetic_oof()
    report, scored = crossfit_figures(oof, table, NAMES, cfg)
    again, scored2 = crossfit_figures(with_scales_and_memory(oof, table), table, NAMES, cfg)
    for key in ("classification", "i2i", "t2i", "t2i_any", "folds"):
        assert report[key] == again[key], key
    assert all(s.settings["wise"] == {"cls": 1.0, "i2i": 1.0, "t2i": 1.0} and s.settings["memory_weight"] == 0.0
               for s in scored.values())


def signal_free(oof, seed=9):
    """The same folds, images and captions, with head, prompt and embedding outputs that carry no signal."""
    rng = np.random.default_rng(seed)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    out = {}
    for k, f in oof.items():
        n, c = f.embedded.emb.shape[0], f.embedded.head[0].shape[1]
        head, prompt = (rng.dirichlet(np.ones(c), size=n).astype(np.float32) for _ in range(2))
        noise = Embedded([head], [prompt], unit(rng.normal(size=f.embedded.emb.shape)), f.embedded.class_emb)
        out[k] = FoldOOF(images=f.images, embedded=noise, captions=f.captions,
                         caption_emb=unit(rng.normal(size=f.caption_emb.shape)))
    return out


def test_in_sample_tuning_would_flatter_the_report(cfg):
    """The point of cross-fitting, on outputs without any signal: settings tuned and scored on the same
    predictions find lucky choices (head weight; alpha and re-ranking); cross-fitted, the figures stay
    at chance."""
    oof, table = synthetic_oof(seed=2, per_fold=30)
    noise = signal_free(oof, seed=12)
    report, _ = crossfit_figures(noise, table, NAMES, cfg)
    t = tune(noise, table, NAMES, cfg)
    in_sample = pooled_classification({k: f.view(t["head_weight"], False) for k, f in noise.items()}, table, NAMES)
    assert in_sample["f1_macro"] > report["classification"]["f1_macro"] + 0.05
    assert abs(report["classification"]["accuracy"] - 1 / 3) < 0.12  # chance, 90 images
    views = {k: f.view(t["head_weight"], False, t["i2i"]["alpha"]) for k, f in noise.items()}
    assert pooled_retrieval(views, table, "i2i", t["i2i"]["rerank"]["kept"])["mrr"] > report["i2i"]["mrr"] + 0.02


def test_each_track_has_its_own_alpha_and_reranking_and_only_meaningful_methods(cfg):
    oof, table = synthetic_oof()
    t = tune(oof, table, NAMES, cfg)
    for track in RETRIEVAL_TRACKS:
        assert set(t[track]) >= {"alpha", "alpha_grid_mrr", "rerank"}
        tried = [s["method"] for s in t[track]["rerank"]["steps"]]
        assert tried == [m for m in cfg.rerank.methods if m in RERANK_OFFERED[track]]
    assert t["t2i"]["rerank"]["not_offered"] == ["qe", "kreciprocal"]
    assert t["i2i"]["rerank"]["not_offered"] == []


def test_infer_command_line_overrides_beat_tuned_values(cfg):
    from conftest import inference_settings

    tuned = {"head_weight": 0.25, "i2i": {"alpha": 0.3, "rerank": {"kept": {"dba": {"k": 2}}}},
             "t2i": {"alpha": 0.1, "rerank": {"kept": {}}}}
    s = inference_settings(cfg, tuned, set())
    assert s["head_weight"] == 0.25 and s["i2i"] == {"alpha": 0.3, "rerank": {"dba": {"k": 2}}}
    assert s["t2i"] == {"alpha": 0.1, "rerank": {}}
    c = load_config(None, ["model.slerp.alpha=0.5", "rerank.methods=[]", "infer.head_weight=1.0"])
    s = inference_settings(c, tuned, {"model.slerp.alpha", "rerank.methods", "infer.head_weight"})
    assert s["head_weight"] == 1.0 and s["i2i"] == s["t2i"] == {"alpha": 0.5, "rerank": {}}
    c = load_config(None, ["model.slerp.infer=false", "rerank.methods=[kreciprocal,class_bonus]"])
    s = inference_settings(c, tuned, {"model.slerp.infer", "rerank.methods"})
    assert s["i2i"]["alpha"] == s["t2i"]["alpha"] == 0.0
    assert list(s["i2i"]["rerank"]) == ["kreciprocal", "class_bonus"] and list(s["t2i"]["rerank"]) == ["class_bonus"]
    old = {"head_weight": 0.5, "alpha": 0.2, "rerank": {"kept": {"qe": {"k": 2, "alpha": 3.0}}}}  # before per-track
    s = inference_settings(cfg, old, set())
    assert s["i2i"]["alpha"] == s["t2i"]["alpha"] == 0.2 and "qe" in s["i2i"]["rerank"]


def test_weight_decay_spares_biases_norms_scale_and_fusion_logits():
    from entrep.engine import param_groups
    from entrep.labels import LabelSet
    from entrep.model.entrep_clip import build_model

    cfg = load_config("configs/demo.yaml", ["model.pretrained="])
    model = build_model(cfg, LabelSet.from_config(cfg.labels))
    groups = param_groups(model, cfg)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert decay_of[id(named["logit_scale"])] == 0 and decay_of[id(named["head.bias"])] == 0
    assert decay_of[id(named["head.weight"])] == cfg.train.weight_decay
    fusion = [n for n in named if n.startswith("fusion.") and named[n].requires_grad]
    assert fusion and all(decay_of[id(named[n])] == 0 for n in fusion)
    lora = [n for n in named if "lora_" in n]
    assert lora and all(decay_of[id(named[n])] == cfg.train.weight_decay for n in lora)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    lrs = {g["lr"] for g in groups}
    assert lrs == {cfg.train.lr_lora, cfg.train.lr_head}
    torch.optim.AdamW(groups)  # a valid optimiser spec
