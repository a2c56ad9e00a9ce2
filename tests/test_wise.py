"""WiSE-FT (infer.wise_grid) and the known-pair memory for t2i (infer.memory_weight): the interpolation is
exact (LoRA delta scaled, fully fine-tuned tensors interpolated), scale 1.0 changes nothing, the OOF files
hold every scale and load when written before them, and the memory out of fold holds other folds only."""
import numpy as np
import pandas as pd
import pytest
import torch

from entrep.config import ConfigError, load_config
from entrep.embedding import Embedded, embed_images, embed_texts, eval_loader
from entrep.labels import LabelSet
from entrep.memory import MEMORY_FILE, Memory, load_memory, mix_queries
from entrep.model.backbone import image_stats
from entrep.model.entrep_clip import build_model
from entrep.oof import FoldOOF, load_fold_oof, save_fold_oof, track_rankings
from entrep.wise import embed_fold_outputs, start_state, wise_scaled, zero_shot_state


def demo_model(*overrides, seed=0):
    cfg = load_config("configs/demo.yaml", ["model.pretrained=", *overrides])
    labels = LabelSet.from_config(cfg.labels)
    model = build_model(cfg, labels).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # "trained" adapters: peft initialises lora_B at zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return cfg, labels, model


def images(model, n=3, seed=1):
    size = image_stats(model.base).size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def outputs(model, x, tokens):
    out = model(x, tokens)
    return {k: out[k].clone() for k in ("emb", "head_logits", "prompt_logits", "text_emb")}


def test_lora_scale_scales_the_low_rank_delta_exactly_and_scale_one_changes_nothing():
    from peft.tuners.lora import LoraLayer

    _, _, model = demo_model()
    x, tokens = images(model), model.tokenize(["a polyp in the left nasal cavity", "erythema"])
    ref = outputs(model, x, tokens)
    layers = [m for m in model.clip.modules() if isinstance(m, LoraLayer)]
    kinds = {type(m).__name__ for m in layers}
    assert "ParamWrapper" in kinds and "Linear" in kinds  # the preset: attn.in_proj_weight + mlp modules
    deltas = {m: m.get_delta_weight("default").clone() for m in layers}
    with wise_scaled(model, 1.0):
        same = outputs(model, x, tokens)
    assert all(torch.equal(ref[k], same[k]) for k in ref)  # bit-identical: scale 1.0 touches nothing
    with wise_scaled(model, 0.3):
        for m in layers:  # every adapted weight gets 0.3 x its low-rank delta, parameter targets included
            torch.testing.assert_close(m.get_delta_weight("default"), 0.3 * deltas[m], rtol=1e-6, atol=1e-8)
        scaled = outputs(model, x, tokens)
    # the manual computation: lora_B itself multiplied by the scale
    with torch.no_grad():
        backup = {n: p.clone() for n, p in model.named_parameters() if "lora_B" in n}
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.3)
        model.invalidate_cache()
        manual = outputs(model, x, tokens)
        for n, p in model.named_parameters():
            if n in backup:
                p.copy_(backup[n])
        model.invalidate_cache()
    for k in ref:
        torch.testing.assert_close(scaled[k], manual[k], rtol=1e-4, atol=1e-5)  # 1.5e-6 seen under load
    assert not torch.allclose(scaled["emb"], ref["emb"], atol=1e-4)
    with wise_scaled(model, 0.0):
        zero = outputs(model, x, tokens)
    with model.clip.disable_adapter():
        model.invalidate_cache()
        base = outputs(model, x, tokens)
    model.invalidate_cache()
    for k in ref:  # scale 0 is the zero-shot backbone (the kit's modules as trained)
        torch.testing.assert_close(zero[k], base[k], rtol=1e-5, atol=1e-6)
    after = outputs(model, x, tokens)
    assert all(torch.equal(ref[k], after[k]) for k in ref)  # restored exactly


def test_full_fine_tuning_interpolates_the_trained_backbone_with_the_base_as_built():
    cfg, labels, model = demo_model("model.lora.enabled=false", "model.lora.train_last_blocks=2")
    start = start_state(model)
    assert start and all(n.startswith("clip.") and "lora_" not in n for n in start)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "training": the unfrozen blocks and the head move
        for n in [*start, "head.weight"]:
            params[n].add_(torch.randn(params[n].shape, generator=g) * 0.1)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    zs = zero_shot_state(cfg, labels, model)  # the base rebuilt: the seeded random init here
    assert set(zs) == set(start) and all(torch.equal(zs[n], start[n]) for n in start)
    x = images(model)
    ref = outputs(model, x, model.tokenize(["erythema"]))
    with wise_scaled(model, 0.3, zs):
        for n, p in model.named_parameters():
            if n in start:
                torch.testing.assert_close(p.detach(), 0.7 * start[n] + 0.3 * trained[n], rtol=0, atol=1e-6)
            else:  # the kit's modules (head, fusion, logit scale) and the frozen backbone stay as they are
                assert torch.equal(p.detach(), trained[n]), n
        mid = outputs(model, x, model.tokenize(["erythema"]))
    assert not torch.allclose(mid["emb"], ref["emb"], atol=1e-4)
    assert all(torch.equal(p.detach(), trained[n]) for n, p in model.named_parameters())  # restored exactly
    with wise_scaled(model, 1.0, zs):
        assert all(torch.equal(ref[k], v) for k, v in outputs(model, x, model.tokenize(["erythema"])).items())


def test_fold_outputs_hold_every_scale_and_the_memory_of_the_training_rows(tmp_path):
    from entrep.engine import make_accelerator

    cfg, labels, model = demo_model("infer.wise_grid=[0.5,1.0]", "infer.memory_weight=[0.0,1.0]")
    accelerator = make_accelerator(cfg)
    model = accelerator.prepare(model)
    stats = image_stats(model.base)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, stats.size, stats.size, 3), dtype=np.uint8)
    table = pd.DataFrame({"image": [f"i{j}.png" for j in range(6)],
                          "captions": [["polyp"], [], ["polyp", "clot"], ["clot"], ["polyp"], []]})
    fold_of = np.array([1, 0, 1, 0, 1, 0])
    val = eval_loader(pixels[fold_of == 0], accelerator, 4)
    oof, _ = embed_fold_outputs(cfg, model, accelerator, labels, table, pixels, fold_of, 0, val, stats, tmp_path)
    # scale 1.0 is exactly what train_fold embedded before WiSE
    plain = embed_images(model, val, accelerator, labels, stats, tta_flip=True)
    assert oof.images == ["i1.png", "i3.png", "i5.png"] and oof.captions == ["clot"]
    assert np.array_equal(oof.embedded.emb, plain.emb) and all(np.array_equal(a, b) for a, b in
                                                                zip(oof.embedded.head, plain.head))
    assert np.array_equal(oof.caption_emb, embed_texts(model, ["clot"], accelerator))
    with wise_scaled(model, 0.5):
        half = embed_images(model, val, accelerator, labels, stats, tta_flip=True)
    assert oof.scales == {0.5, 1.0} and np.array_equal(oof.scaled[0.5][0].emb, half.emb)
    memory = load_memory(tmp_path / MEMORY_FILE)
    assert memory.images == ["i0.png", "i2.png", "i4.png", "i1.png", "i3.png", "i5.png"]  # training rows first
    assert memory.held_out.tolist() == [False, False, False, True, True, True] and memory.scales == {0.5, 1.0}
    assert np.array_equal(memory.embedded[1.0].emb[3:], plain.emb)  # held-out rows reuse the OOF pass
    assert memory.carriers(include_held_out=False) == {"polyp": [0, 1, 2], "clot": [1]}
    assert memory.carriers(include_held_out=True)["clot"] == [1, 4]
    save_fold_oof(tmp_path / "oof.npz", oof)
    back = load_fold_oof(tmp_path / "oof.npz")
    assert back.scales == {0.5, 1.0} and np.array_equal(back.scaled[0.5][1], oof.scaled[0.5][1])
    assert back.memory is not None and back.memory.pair_caption == memory.pair_caption
    # infer.memory_weight off: no memory file, and an earlier one is removed (it would be another model's)
    cfg.infer.memory_weight = [0.0]
    embed_fold_outputs(cfg, model, accelerator, labels, table, pixels, fold_of, 0, val, stats, tmp_path,
                       scales=[1.0])
    assert not (tmp_path / MEMORY_FILE).exists()


def test_oof_files_from_before_wise_load_as_the_model_as_trained(tmp_path):
    """oof.npz as train.py wrote it before WiSE: scale 1.0 only, no memory; its views are unchanged."""
    rng = np.random.default_rng(0)
    head, prompt = rng.dirichlet(np.ones(3), size=(2, 4)).astype(np.float32)
    emb = rng.normal(size=(4, 8)).astype(np.float32)
    class_emb, cap = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(2, 8)).astype(np.float32)
    with open(tmp_path / "oof.npz", "wb") as f:
        np.savez(f, images=np.array(["a", "b", "c", "d"]), emb=emb, head=np.stack([head]),
                 captions=np.array(["x", "y"]), caption_emb=cap, text=np.array(True), prompt=np.stack([prompt]),
                 class_emb=class_emb)
    old = load_fold_oof(tmp_path / "oof.npz")
    assert old.scales == {1.0} and old.scaled == {} and old.memory is None
    v0, v1 = old.view(0.5, False, 0.2), old.view(0.5, False, 0.2, wise=1.0, memory_weight=0.0)
    assert np.array_equal(v0.probs, v1.probs) and np.array_equal(v0.caption_emb, v1.caption_emb)
    assert all(np.array_equal(v0.ret[t], v1.ret[t]) for t in v0.ret)
    from entrep.oof import MissingOutputs

    with pytest.raises(MissingOutputs, match="WiSE scale 0.5.*infer.wise_grid"):
        old.view(0.5, False, 0.2, wise=0.5)
    with pytest.raises(MissingOutputs, match="no known-pair memory.*infer.memory_weight"):
        old.view(0.5, False, 0.2, memory_weight=0.5)
    save_fold_oof(tmp_path / "again.npz", old)  # written again: the same keys as before WiSE
    with np.load(tmp_path / "again.npz") as a, np.load(tmp_path / "oof.npz") as b:
        assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)


def test_memory_queries_mix_text_and_the_carriers_prototype():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(3, 4)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    m = rng.normal(size=(3, 4)).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    has = np.array([True, False, True])
    out = mix_queries(q, m, has, 0.25)
    want = 0.75 * q[0] + 0.25 * m[0]
    np.testing.assert_allclose(out[0], want / np.linalg.norm(want), rtol=1e-6)
    assert np.array_equal(out[1], q[1])  # a caption no memory image carries keeps its text
    assert mix_queries(q, m, has, 0.0) is q


def test_the_grids_are_checked():
    for bad in ("infer.wise_grid=[]", "infer.wise_grid=[1.5]", "infer.memory_weight=[-0.1]"):
        with pytest.raises(ConfigError, match="non-empty list of values in \\[0, 1\\]"):
            load_config(None, [bad])
    from entrep.commands.ablate import inference_only

    # both are scoring keys: an ablation rung switching them on re-scores the previous rung's folds
    assert inference_only(["infer.wise_grid=[0.0,0.25,0.5,0.75,1.0]", "infer.memory_weight=[0.0,0.5,1.0]"])


def test_inference_applies_the_tuned_scales_and_memory_unless_the_command_line_sets_one():
    from conftest import inference_settings

    cfg = load_config(None, ["model.pretrained="])
    tuned = {"head_weight": 0.25, "wise": {"cls": 1.0, "i2i": 0.5, "t2i": 0.75}, "memory_weight": 0.5,
             "i2i": {"alpha": 0.3, "rerank": {"kept": {}}}, "t2i": {"alpha": 0.1, "rerank": {"kept": {}}}}
    s = inference_settings(cfg, tuned, set())
    assert s["wise"] == {"cls": 1.0, "i2i": 0.5, "t2i": 0.75} and s["memory_weight"] == 0.5
    c = load_config(None, ["infer.wise_grid=[1.0]", "infer.memory_weight=[0.0]"])
    s = inference_settings(c, tuned, {"infer.wise_grid", "infer.memory_weight"})
    assert s["wise"] == {"cls": 1.0, "i2i": 1.0, "t2i": 1.0} and s["memory_weight"] == 0.0
    c = load_config(None, ["infer.wise_grid=[0.0,1.0]"])  # a grid tunes nothing at inference
    assert inference_settings(c, tuned, {"infer.wise_grid"})["wise"] == tuned["wise"]
    old = {"head_weight": 0.5, "i2i": {"alpha": 0.2, "rerank": {"kept": {}}}, "t2i": {"alpha": 0.2, "rerank": {"kept": {}}}}
    s = inference_settings(cfg, old, set())
    assert s["wise"] == {"cls": 1.0, "i2i": 1.0, "t2i": 1.0} and s["memory_weight"] == 0.0


def test_memory_prototypes_use_the_other_folds_carriers_at_the_gallerys_settings():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4, 6)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    head = rng.dirichlet(np.ones(3), size=4).astype(np.float32)
    class_emb = rng.normal(size=(3, 6)).astype(np.float32)
    class_emb /= np.linalg.norm(class_emb, axis=1, keepdims=True)
    e = Embedded([head], [head[::-1].copy()], emb, class_emb)
    mem = Memory(["a", "b", "c", "d"], np.array([False, False, True, True]), {1.0: e},
                 np.array([0, 1, 2, 3]), ["x", "x", "x", "y"])
    proto, has = mem.prototypes(["x", "y", "z"], 1.0, 0.5, False, 0.2, include_held_out=False)
    assert has.tolist() == [True, False, False]  # y is carried by a held-out image only, z by none
    from entrep.embedding import retrieval_embedding

    ret = retrieval_embedding(emb[:2], e.probs(0.5, False)[:2], class_emb, 0.2)
    want = ret.mean(0) / np.linalg.norm(ret.mean(0))
    np.testing.assert_allclose(proto[0], want, rtol=1e-5)
    _, has_all = mem.prototypes(["x", "y", "z"], 1.0, 0.5, False, 0.2, include_held_out=True)
    assert has_all.tolist() == [True, True, False]  # at inference every training image is memory


def leaky_case(per_fold=24, folds=3, seed=0):
    """Signal-free folds where caption j is carried by image j of every fold, and each fold's memory holds
    every fold's images, its own held-out ones with exactly their OOF embeddings."""
    from test_report import NAMES

    rng = np.random.default_rng(seed)

    def unit(x):
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    emb = unit(rng.normal(size=(folds, per_fold, 256)))
    rows, oof = [], {}
    for k in range(folds):
        names = [f"f{k}_{j}.png" for j in range(per_fold)]
        rows += [{"image": n, "y": j % 3, "label": NAMES[j % 3], "partners": [], "captions": [f"finding {j}"]}
                 for j, n in enumerate(names)]
    for k in range(folds):
        head = rng.dirichlet(np.ones(3), size=per_fold).astype(np.float32)
        e = Embedded([head], None, emb[k], None)
        # fold k's model embeds the other folds' images its own way (noise here), its held-out ones as in the OOF
        other = {j: unit(rng.normal(size=(per_fold, 256))) for j in range(folds) if j != k}
        order = [j for j in range(folds) if j != k] + [k]
        mem_emb = np.concatenate([other[j] if j != k else emb[k] for j in order])
        images = [f"f{j}_{i}.png" for j in order for i in range(per_fold)]
        memory = Memory(images, np.array([j == k for j in order for _ in range(per_fold)]),
                        {1.0: Embedded([np.tile(head, (folds, 1))], None, mem_emb, None)},
                        np.arange(len(images)), [f"finding {i}" for _ in order for i in range(per_fold)])
        caps = unit(rng.normal(size=(per_fold, 256)))
        oof[k] = FoldOOF(images=[f"f{k}_{j}.png" for j in range(per_fold)], embedded=e,
                         captions=[f"finding {j}" for j in range(per_fold)], caption_emb=caps, memory=memory)
    return oof, pd.DataFrame(rows)


def test_the_memory_out_of_fold_holds_only_the_other_folds_pairs():
    """A memory that held the fold's own pairs would answer every caption with its held-out carrier
    (R@1 = 1); fold k's memory leaves them out, and the cross-fitted figure stays at chance."""
    from dataclasses import replace

    from entrep.metrics import retrieval_metrics
    from entrep.figures import crossfit_figures
    from test_report import NAMES

    oof, table = leaky_case()
    cfg = load_config(None, ["model.pretrained=", "infer.tta_flip=false", "rerank.methods=[]",
                             "infer.memory_weight=[0.0,1.0]"])

    def r1(folds, weight):
        rk, rel = [], []
        for f in folds.values():
            r, s, *_ = track_rankings(f.view(1.0, False, 0.0, memory_weight=weight), table, "t2i")
            rk, rel = rk + r, rel + s
        return retrieval_metrics(rk, rel)["recall@1"]

    leaky = {k: replace(f, memory=replace(f.memory, held_out=np.zeros_like(f.memory.held_out))) for k, f in oof.items()}
    assert r1(leaky, 1.0) == 1.0  # the in-fold leak this guards against
    assert r1(oof, 1.0) < 0.25  # the held-out carriers are not in the memory: chance is 1/24
    report, scored = crossfit_figures(oof, table, NAMES, cfg)
    assert report["t2i"]["recall@1"] < 0.25
    leaked, leaked_scored = crossfit_figures(leaky, table, NAMES, cfg)
    assert leaked["t2i"]["recall@1"] == 1.0 and all(s.settings["memory_weight"] == 1.0 for s in leaked_scored.values())
    assert all(s.settings["memory_weight"] in (0.0, 1.0) for s in scored.values())


def test_a_blend_member_applies_its_own_scales_and_memory():
    from pathlib import Path

    from entrep.ensemble import Member
    from entrep.figures import crossfit_figures
    from entrep.settings import Settings
    from entrep.tuning import tune
    from test_report import NAMES, synthetic_oof, with_scales_and_memory

    oof, table = synthetic_oof(seed=3)
    oof = with_scales_and_memory(oof, table)
    cfg = load_config(None, ["model.pretrained=", "infer.tta_flip=false", "model.slerp.alpha_grid=[0.0,0.2]",
                             "rerank.methods=[dba]", "infer.wise_grid=[0.0,0.5,1.0]", "infer.memory_weight=[0.0,1.0]"])
    report, _ = crossfit_figures(oof, table, NAMES, cfg)
    m = Member(Path("A"), cfg, oof, report, Settings.from_tuning(tune(oof, table, NAMES, cfg)))
    for held_out in (None, 0):
        s = m.settings(held_out)
        want = {k: f.view(s.head_weight, False, {t: s.track(t).alpha for t in ("i2i", "t2i")}, s.wise,
                          s.memory_weight) for k, f in oof.items()}
        got = m.views(held_out)
        assert all(np.array_equal(got[k].caption_emb, want[k].caption_emb) and np.array_equal(got[k].probs, want[k].probs)
                   and all(np.array_equal(got[k].ret[t], want[k].ret[t]) for t in ("i2i", "t2i")) for k in oof)
    assert m.settings(None) is m.tuned


@pytest.mark.slow
def test_rescoring_adds_scales_and_memory_tuned_json_records_them_and_infer_applies_them(demo, trained_demo_run,
                                                                                         tmp_path, capsys):
    """A finished run re-scored with the grids (no retraining): its OOF files gain the scales and the memory
    from the saved weights (scale 1.0 kept bit for bit), tuned.json and the report record the choices, infer.py
    applies them, and at scale 1 / no memory it writes exactly the predictions of before."""
    import json
    import shutil

    import entrep
    from conftest import ok, py
    from entrep.commands.infer import main as infer

    run = tmp_path / "a"
    shutil.copytree(trained_demo_run, run)

    def predictions():
        return {f: (run / "predictions" / f).read_bytes() for f in ("classes.csv", "i2i.json", "t2i.json")}

    ok(capsys, infer, ["--run", run, "--data", demo / "test"])
    before_files = predictions()
    before_oof = {k: load_fold_oof(run / f"fold{k}/oof.npz") for k in (0, 1)}
    original = json.loads((run / "tuned.json").read_text())
    r = py("train.py", "--name", "a", f"output_dir={tmp_path}", "train.resume=true", "infer.wise_grid=[0.5,1.0]",
             "infer.memory_weight=[0.0,1.0]")
    out = " ".join((r.stdout + r.stderr).split())
    assert "embedding WiSE scales [0.5] and the known-pair memory from the saved weights" in out
    folds = pd.read_csv(run / "folds.csv")
    for k in (0, 1):
        oof = load_fold_oof(run / f"fold{k}/oof.npz")
        assert oof.scales == {0.5, 1.0} and np.array_equal(oof.embedded.emb, before_oof[k].embedded.emb)
        assert np.array_equal(oof.caption_emb, before_oof[k].caption_emb)
        held = dict(zip(oof.memory.images, oof.memory.held_out))
        assert held == dict(zip(folds["image"], folds["fold"] == k))  # out of fold: the other fold's pairs only
    tuned = json.loads((run / "tuned.json").read_text())
    report = json.loads((run / "report.json").read_text())
    assert set(tuned["wise"]) == {"cls", "i2i", "t2i"} and tuned["memory_weight"] in (0.0, 1.0)
    assert all("wise" in f["settings"] and "memory_weight" in f["settings"] for f in report["folds"])
    ok(capsys, infer, ["--run", run, "--data", demo / "test"])
    meta = json.loads((run / "predictions/meta.json").read_text())
    assert meta["wise"] == tuned["wise"] and meta["memory_weight"] == tuned["memory_weight"]
    # the tuned settings of before, with WiSE and the memory recorded at scale 1 / weight 0: bit-identical files
    (run / "tuned.json").write_text(json.dumps(original | {"wise": dict.fromkeys(("cls", "i2i", "t2i"), 1.0),
                                                           "memory_weight": 0.0}))
    ok(capsys, infer, ["--run", run, "--data", demo / "test"])
    assert predictions() == before_files
    half = entrep.predict(run, demo / "test", ["infer.wise_grid=[0.5]", "infer.memory_weight=[1.0]"])
    plain = entrep.predict(run, demo / "test", ["infer.wise_grid=[1.0]", "infer.memory_weight=[0.0]"])
    assert half.meta["wise"] == {"cls": 0.5, "i2i": 0.5, "t2i": 0.5} and half.meta["memory_weight"] == 1.0
    assert not half.rankings("t2i")["score"].equals(plain.rankings("t2i")["score"])
    assert not np.allclose(half.classes.filter(like="p_").to_numpy(), plain.classes.filter(like="p_").to_numpy())


@pytest.mark.slow
def test_infer_on_a_folds_held_out_images_gives_that_folds_oof_view(demo, trained_demo_run, tmp_path):
    """OOF scoring and infer.py make a fold's view in one place (FoldOOF.view): fold 0's model, run by
    infer.py on fold 0's held-out images as a test folder, gives the class probabilities its OOF file gives
    them under tuned.json's settings."""
    import shutil

    import entrep
    from entrep.settings import read_tuned

    run = tmp_path / "a"
    shutil.copytree(trained_demo_run, run)
    (run / "fold1/metrics.json").unlink()  # fold 0 alone is ensembled (infer.partial=use)
    from entrep.data.release import load_release
    from entrep.labels import ENTREP_CLASSES

    folds = pd.read_csv(run / "folds.csv")
    held = folds.loc[folds["fold"] == 0, "image"].tolist()
    path = dict(zip(*load_release(demo, ENTREP_CLASSES)[0][["image", "path"]].T.to_numpy()))
    (tmp_path / "test/imgs").mkdir(parents=True)
    for n in held:  # under the name the folds list (a public image's file is spelled _Image on disk)
        shutil.copyfile(path[n], tmp_path / "test/imgs" / n)
    (tmp_path / "test/cls.csv").write_text("\n".join(held) + "\n")
    pred = entrep.predict(run, tmp_path / "test", ["infer.partial=use"])
    settings = read_tuned(run)
    oof = load_fold_oof(run / "fold0/oof.npz")
    view = oof.view(**settings.view_kwargs())
    want = pd.DataFrame(view.probs, index=oof.images).loc[held].to_numpy()
    got = pred.classes.set_index("image").loc[held].filter(like="p_").to_numpy()
    assert pred.meta["folds"] == ["fold0"] and len(held) > 10
    np.testing.assert_allclose(got, want, atol=2e-4)
