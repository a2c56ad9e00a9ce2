"""The fine-tuning recipe's switches (issue 23), each off or neutral by default: weight EMA, mixup and
cutmix with soft targets, layer-wise learning-rate decay, input size above pretraining, pseudo-labels
without a leak, and where a run's time goes."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from entrep.config import load_config
from entrep.labels import ENTREP_CLASSES, LabelSet
from entrep.model.entrep_clip import build_model

ROOT = Path(__file__).parents[1]


@pytest.fixture()
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _step(*overrides, seed=0):
    """A TrainStep of the tiny model on 8 random images (4 labelled, 2 captioned)."""
    from entrep.data.dataset import TrainDataset
    from entrep.engine import TrainStep, make_accelerator
    from entrep.model.backbone import image_stats

    cfg = load_config(ROOT / "configs/demo.yaml", ["train.batch_size=8", "train.warmup_frac=0", *overrides])
    labels = LabelSet.from_config(cfg.labels)
    torch.manual_seed(seed)
    model = build_model(cfg, labels)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (8, 74, 74, 3), dtype=np.uint8)
    ds = TrainDataset(pixels, y=np.array([0, 1, 2, 3, -1, 4, -1, 1]), captions=[["a polyp"], [], [], ["erythema"],
                      [], [], [], []], groups=np.full(8, -1), index=np.arange(8), labels=labels, hflip=False)
    acc = make_accelerator(cfg, cpu=True)
    return TrainStep.for_dataset(cfg, acc, model, ds, image_stats(model.base), steps=10), cfg


def _trainable(m):
    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def test_ema_off_leaves_the_step_as_it_was_and_on_averages_with_warm_up(fresh_accelerate_state):
    plain, _ = _step()
    assert plain.ema is None and plain.mix is None
    step, _ = _step("train.ema_decay=0.9")
    batch = next(iter(step.loader))
    before = _trainable(step.unwrapped)
    step(dict(batch))
    after = _trainable(step.unwrapped)
    for n in before:  # debiased (the default): the first update's average is the weights themselves
        torch.testing.assert_close(step.ema.shadow[n], after[n])
    assert step.ema.updates == 1


@pytest.mark.parametrize("warmup,differ", [("debiased", True), ("timm", False), ("tf", False)])
def test_ema_decays_099_and_0999_differ_at_the_recipes_step_count_only_when_debiased(warmup, differ):
    """At the ViT-B/16 recipe's 360 steps, TensorFlow's warm-up (the kit's before train.ema_warmup)
    and timm's both stay below 0.99, so 0.99 and 0.999 average bit-identically; debiased does not."""
    from entrep.engine import WeightEMA

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    path = [torch.randn(3, 4) for _ in range(360)]
    out = {}
    for decay in (0.99, 0.999):
        ema = WeightEMA(model, decay, warmup)
        with torch.no_grad():
            for w in path:
                model.weight.copy_(w)
                ema.update(model)
        out[decay] = ema.shadow["weight"]
    assert torch.equal(out[0.99], out[0.999]) != differ
    if warmup == "debiased":  # the exact exponentially weighted mean of the path, no initial weight in it
        for decay in (0.99, 0.999):
            wts = torch.tensor([decay ** (359 - s) for s in range(360)], dtype=torch.float64)
            ref = (torch.stack(path).double() * wts[:, None, None]).sum(0) / wts.sum()
            torch.testing.assert_close(out[decay].double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_loss_that_is_not_finite_stops_the_fold_naming_the_step_and_learning_rates(fresh_accelerate_state, demo,
                                                                                     monkeypatch, bad):
    """Fault injection: the third train step returns a non-finite loss (a diverged run, an fp16/bf16
    overflow). The fold stops there in one line; nothing after it runs, so nothing of it is saved."""
    from entrep.data.folds import link_groups
    from entrep.data.images import decode_all
    from entrep.data.release import load_release
    from entrep.engine import FoldTrainer, NonFiniteLoss, TrainStep, make_accelerator
    from entrep.model.backbone import image_stats

    cfg = load_config(ROOT / "configs/demo.yaml", ["train.epochs=2", "train.batch_size=8", "train.monitor_metric=none",
                                                   "train.lr_lora=0.5"])
    labels = LabelSet.from_config(cfg.labels)
    df = load_release(demo, labels.names)[0].head(32).reset_index(drop=True)
    acc = make_accelerator(cfg, cpu=True)
    model = build_model(cfg, labels)
    real, calls = TrainStep.__call__, []

    def step(self, batch):
        loss, parts = real(self, batch)
        calls.append(loss)
        return (bad if len(calls) == 3 else loss), parts

    monkeypatch.setattr(TrainStep, "__call__", step)
    with pytest.raises(NonFiniteLoss) as e:
        FoldTrainer(cfg, acc, labels).fit(model, decode_all(df["path"].tolist(), cfg.data.working_side(64)), df,
                                          np.arange(32), np.array([], int), link_groups(df), image_stats(model.base),
                                          tag="fold 0")
    msg = str(e.value)
    assert "\n" not in msg and len(calls) == 3
    assert f"fold 0: the loss is {bad} at epoch 1, step 3 of 4 (train.lr_lora=0.5, train.lr_head=" in msg
    assert "the fold is left unfinished" in msg


def test_a_figure_that_is_not_finite_is_never_written_as_json(tmp_path):
    from entrep.errors import EntrepError
    from entrep.io import atomic_files, atomic_write_json

    atomic_write_json(tmp_path / "report.json", {"mrr": 0.5})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(EntrepError, match="report.json: not written: it would hold a value that is not a finite"):
            atomic_write_json(tmp_path / "report.json", {"folds": [{"mrr": bad}]})
        with pytest.raises(EntrepError, match="tuned.json: not written"):
            with atomic_files(tmp_path) as files:
                files.write_json("tuned.json", {"head_weight": bad})
    assert json.loads((tmp_path / "report.json").read_text()) == {"mrr": 0.5}  # the file before stays whole
    assert not (tmp_path / "tuned.json").exists()


def test_a_fold_trained_with_ema_saves_the_averaged_weights(fresh_accelerate_state, tmp_path, demo):
    from entrep.data.folds import link_groups
    from entrep.data.images import decode_all
    from entrep.data.release import load_release
    from entrep.engine import FoldTrainer, make_accelerator
    from entrep.model.backbone import image_stats
    from entrep.model.checkpoint import load_fold_weights, save_weights

    cfg = load_config(ROOT / "configs/demo.yaml", ["train.epochs=1", "train.batch_size=16", "train.ema_decay=0.99",
                                                   "train.monitor_metric=none"])
    labels = LabelSet.from_config(cfg.labels)
    df = load_release(demo, labels.names)[0].head(32).reset_index(drop=True)
    acc = make_accelerator(cfg, cpu=True)
    torch.manual_seed(0)
    model = build_model(cfg, labels)
    pixels = decode_all(df["path"].tolist(), cfg.data.working_side(64))
    trainer = FoldTrainer(cfg, acc, labels)
    captured = {}
    real_copy = __import__("entrep.engine", fromlist=["WeightEMA"]).WeightEMA.copy_to

    def spy(self, m):
        captured.update({n: t.clone() for n, t in self.shadow.items()})
        return real_copy(self, m)

    import entrep.engine
    entrep.engine.WeightEMA.copy_to = spy
    try:
        trainer.fit(model, pixels, df, np.arange(32), np.array([], int), link_groups(df), image_stats(model.base))
    finally:
        entrep.engine.WeightEMA.copy_to = real_copy
    m = acc.unwrap_model(model)
    assert captured and all(torch.equal(p, captured[n]) for n, p in m.named_parameters() if n in captured)
    save_weights(m, tmp_path / "fold0", {"model_name": cfg.model.name, "labels": list(labels.names)})
    fresh = build_model(cfg, labels)
    load_fold_weights(fresh, tmp_path / "fold0", "fold0")
    reloaded = dict(fresh.named_parameters())
    for n, t in captured.items():
        key = n.replace(".default.", ".fold0.")
        assert torch.equal(reloaded[key], t), n  # the fold's weights are the EMA, bit for bit


def test_mixup_and_cutmix_mix_labelled_images_with_soft_targets_and_spare_the_contrastive_terms():
    from entrep.engine import BatchMix

    cfg = load_config(ROOT / "configs/demo.yaml", ["train.mixup_alpha=0.4", "train.cutmix_alpha=1.0",
                                                   "loss.label_smoothing=0"])
    mix = BatchMix(cfg, 7)
    torch.manual_seed(0)
    np.random.seed(0)
    x = torch.randn(6, 3, 8, 8)
    batch = mix({"image": x.clone(), "y": torch.tensor([0, 1, -1, 2, 3, 4]), "group": torch.full((6,), -1)})
    assert torch.equal(batch["image"][2], x[2]) and not batch["mixed"][2]  # unlabelled: never mixed
    assert batch["mixed"].any()
    soft = batch["soft_targets"]
    torch.testing.assert_close(soft[batch["y"] >= 0].sum(1), torch.ones(5))
    mixed = batch["mixed"].nonzero().squeeze(1)
    assert all((soft[i] > 0).sum() == 2 for i in mixed)  # a mixed image's target shares two classes
    # a left and a right image mixed give the proportional soft target across the two laterality classes


def test_mixed_rows_leave_the_contrastive_losses_only():
    from entrep.losses import joint_loss

    cfg = load_config(ROOT / "configs/demo.yaml").loss
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    out = {"emb": emb, "head_logits": torch.randn(4, 3), "prompt_logits": torch.randn(4, 3)}
    y, group = torch.tensor([0, 1, 1, 2]), torch.full((4,), -1)
    soft = torch.nn.functional.one_hot(y, 3).float()
    mixed = torch.tensor([False, True, False, False])
    _, parts = joint_loss(out, y, group, None, None, torch.tensor(10.0), cfg, soft_targets=soft * 0.9 + 0.1 / 3,
                          mixed=mixed)
    keep = ~mixed
    _, alone = joint_loss({k: v[keep] for k, v in out.items()}, y[keep], group[keep], None, None, torch.tensor(10.0),
                          cfg)
    assert parts["image"] == pytest.approx(alone["image"])  # supcon as if the mixed image were not there
    _, hard = joint_loss(out, y, group, None, None, torch.tensor(10.0), cfg)
    assert parts["ce"] == pytest.approx(hard["ce"], rel=1e-5)  # smoothed soft targets = label smoothing


@pytest.mark.parametrize("name", ["entrep-tiny", "entrep-tiny-convnext", "entrep-tiny-eva", "entrep-tiny-rn"])
def test_layer_decay_scales_each_blocks_learning_rate_by_its_depth(name):
    from entrep.engine import layer_depths, param_groups

    cfg = load_config(ROOT / "configs/demo.yaml", [f"model.name={name}", "train.layer_decay=0.5"])
    m = build_model(cfg, LabelSet.from_config(cfg.labels))
    depth = layer_depths(m)
    lr_of = {id(p): g["lr"] for g in param_groups(m, cfg) for p in g["params"]}
    adapters = [(n, p) for n, p in m.named_parameters() if "lora_" in n]
    assert adapters and all(n in depth for n, _ in adapters)
    for n, p in adapters:
        assert lr_of[id(p)] == pytest.approx(cfg.train.lr_lora * 0.5 ** depth[n])
    assert len({depth[n] for n, _ in adapters if "visual" in n}) > 1  # deeper blocks really differ
    assert lr_of[id(dict(m.named_parameters())["head.weight"])] == cfg.train.lr_head
    off = load_config(ROOT / "configs/demo.yaml", [f"model.name={name}"])
    assert {g["lr"] for g in param_groups(m, off)} == {off.train.lr_lora, off.train.lr_head}


def test_full_finetuning_gets_layer_decay_down_to_the_embeddings():
    from entrep.engine import layer_depths

    cfg = load_config(ROOT / "configs/demo.yaml", ["model.lora.enabled=false", "model.lora.train_last_blocks=-1",
                                                   "train.layer_decay=0.8"])
    m = build_model(cfg, LabelSet.from_config(cfg.labels))
    d = layer_depths(m)
    assert d["clip.visual.positional_embedding"] == 7 and d["clip.visual.ln_post.weight"] == 0
    assert d["clip.visual.transformer.resblocks.0.mlp.c_fc.weight"] == 6
    assert d["clip.visual.proj"] == 0  # the projection is the head (x1 as in timm), not the stem
    assert d["clip.token_embedding.weight"] == d["clip.positional_embedding"] == 5  # text: 4 blocks + 1
    assert d["clip.ln_final.weight"] == d["clip.text_projection"] == 0


@pytest.mark.parametrize("name,lora", [("timm:test_vit", True), ("timm:test_convnext", False),
                                       ("timm:test_resnet", False), ("timm:test_efficientnet", True),
                                       ("entrep-tiny-convnext", True)])
def test_layer_decay_on_a_timm_trunk_is_timms_own(name, lora):
    """Every trainable trunk tensor's learning rate is lr_lora x the lr_scale timm's
    param_groups_layer_decay gives it (a ConvNeXt stage's downsample with its stage, not at the top)."""
    import math

    from timm.optim import param_groups_layer_decay

    from entrep.engine import param_groups

    full = [] if lora else ["model.lora.enabled=false", "model.lora.train_last_blocks=-1"]
    cfg = load_config(ROOT / "configs/demo.yaml", [f"model.name={name}", "train.layer_decay=0.5"] + full)
    m = build_model(cfg, LabelSet.from_config(cfg.labels))
    lr = {id(p): g["lr"] for g in param_groups(m, cfg) for p in g["params"]}
    trunk = m.base.visual.trunk
    scale = {id(p): g["lr_scale"] for g in param_groups_layer_decay(trunk, layer_decay=0.5) for p in g["params"]}
    trained = [(n, p) for n, p in trunk.named_parameters() if p.requires_grad]
    assert trained and len({scale[id(p)] for _, p in trained}) > 2
    for n, p in trained:
        assert math.isclose(lr[id(p)], cfg.train.lr_lora * scale[id(p)]), n


def test_a_vit_above_its_pretraining_size_gets_resampled_position_embeddings(tmp_path):
    from safetensors.torch import save_file

    from entrep.model.backbone import create_clip

    clip, _ = create_clip("entrep-tiny")
    save_file(clip.state_dict(), str(tmp_path / "w.safetensors"))  # weights "pretrained" at 64 px
    cfg = load_config(ROOT / "configs/demo.yaml", [f"model.pretrained={tmp_path}/w.safetensors",
                                                   "model.image_size=96"])
    m = build_model(cfg, LabelSet.from_config(cfg.labels)).eval()
    assert m.base.visual.image_size in (96, (96, 96))
    assert m.base.visual.positional_embedding.shape[0] == (96 // 8) ** 2 + 1  # 8 px patches, plus the CLS
    out = m(torch.randn(2, 3, 96, 96))
    assert torch.isfinite(out["emb"]).all()
    torch.testing.assert_close(m.base.visual.positional_embedding[0], clip.visual.positional_embedding[0])  # CLS kept


def test_pseudo_labels_need_the_same_folds(tmp_path, demo):
    """Checked before any model is built: a source run (config.yaml, folds.csv) whose folds differ."""
    import pandas as pd

    from entrep.config import save_config
    from entrep.errors import EntrepError
    from entrep.training import RunData, pseudo_labels

    source = tmp_path / "src"
    cfg = load_config(ROOT / "configs/demo.yaml", [f"train.pseudo_from={source}", f"train.pseudo_data={demo / 'test'}",
                                                   f"output_dir={tmp_path}"])
    save_config(cfg, source / "config.yaml")
    folds = pd.DataFrame({"image": ["a.png", "b.png", "c.png", "d.png"], "fold": [0, 1, 0, 1]})
    folds.to_csv(source / "folds.csv", index=False)
    data = RunData(LabelSet.from_config(cfg.labels), None, None, folds)
    other = RunData(data.labels, None, None, folds.assign(fold=1 - folds["fold"]))
    with pytest.raises(EntrepError, match="has other folds than this run .*a.png"):
        pseudo_labels(cfg, None, other, 0)
    with pytest.raises(EntrepError, match="fold0 is not finished"):  # the same folds pass the check
        pseudo_labels(cfg, None, data, 0)


def _test_folder_with_training_copies(demo, dest):
    """The demo's test folder plus a byte-identical copy and a re-exposed copy of training images,
    under test-style names: (folder, {copy name: training name})."""
    import shutil

    from PIL import Image, ImageEnhance

    from entrep.data.release import load_release

    shutil.copytree(demo / "test", dest)
    table = load_release(demo, ENTREP_CLASSES)[0]
    a, b = table["path"].iloc[3], table["path"].iloc[11]
    shutil.copyfile(a, dest / "imgs/copy-same-bytes.png")
    with Image.open(b) as im:
        ImageEnhance.Brightness(im.convert("RGB")).enhance(1.08).save(dest / "imgs/copy-brighter.png")
    return dest, {"copy-same-bytes.png": table["image"].iloc[3], "copy-brighter.png": table["image"].iloc[11]}


def test_test_images_that_copy_training_images_are_no_pseudo_labels(tmp_path, demo):
    from entrep.data.release import load_release, load_test
    from entrep.training import training_copies

    folder, copies = _test_folder_with_training_copies(demo, tmp_path / "test")
    cfg = load_config(ROOT / "configs/demo.yaml")
    table = load_release(demo, ENTREP_CLASSES)[0]
    out = training_copies(cfg, load_test(folder), table)
    assert out["copy-same-bytes.png"] == f"the same file as {copies['copy-same-bytes.png']}"
    assert out["copy-brighter.png"].startswith(f"a near-duplicate of {copies['copy-brighter.png']} (")
    off = training_copies(load_config(ROOT / "configs/demo.yaml", ["cv.near_dup=false"]), load_test(folder), table)
    assert "copy-same-bytes.png" in off and "copy-brighter.png" not in off  # bytes are always checked


def test_pseudo_labels_take_the_settings_that_scored_the_source_fold(tmp_path):
    from entrep.errors import EntrepError
    from entrep.training import source_fold_settings

    with pytest.raises(EntrepError, match="no report.json; the settings that label fold 1"):
        source_fold_settings(tmp_path, 1, True)
    row = {"head_weight": 0.75, "wise": {"cls": 0.5, "i2i": 1.0, "t2i": 1.0}, "memory_weight": 0.0,
           "i2i": {"alpha": 0.2, "rerank": ["dba"]}, "t2i": {"alpha": 0.0, "rerank": []}}
    (tmp_path / "report.json").write_text(json.dumps({"folds": [{"fold": 0, "settings": {"head_weight": 0.25}},
                                                                {"fold": 1, "settings": row}]}))
    s = source_fold_settings(tmp_path, 1, False)  # the source's TTA: a report row holds none
    assert (s.head_weight, s.wise["cls"], s.tta_flip, s.i2i.alpha, list(s.i2i.rerank)) == (0.75, 0.5, False, 0.2, ["dba"])
    assert s.report_row() == row  # a row reads back as it was written
    with pytest.raises(EntrepError, match="no settings for fold 2"):
        source_fold_settings(tmp_path, 2, True)


@pytest.mark.slow
def test_timing_stages_add_up_to_the_run_wall_time(trained_demo_run):
    t = json.loads((trained_demo_run / "timing.json").read_text())
    assert {"start_up", "release", "image_cache", "folds", "build", "train_steps", "oof_embedding", "save",
            "report"} <= set(t["stages"])
    assert abs(sum(t["stages"].values()) - t["total_s"]) <= 0.1 * t["total_s"]
    assert set(t["folds"]) == {"0", "1"} and 0 < t["outside_train_steps"] < 1


@pytest.mark.slow
def test_a_pseudo_labelled_run_takes_fold_k_labels_from_fold_k_and_reports_them(tmp_path, trained_demo_run, demo):
    import os
    import subprocess
    import sys

    folder, copies = _test_folder_with_training_copies(demo, tmp_path / "test")
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/demo.yaml", "--data", str(demo), "--name", "pl",
                        f"output_dir={tmp_path}", "cv.n_splits=2", "train.epochs=1",
                        f"cv.folds_from={trained_demo_run}", f"train.pseudo_from={trained_demo_run}",
                        f"train.pseudo_data={folder}", "train.pseudo_threshold=0.0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env=dict(os.environ, COLUMNS="250"))
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 0, out[-3000:]
    source = json.loads((trained_demo_run / "report.json").read_text())
    for k in (0, 1):  # each fold's labels come from the source run's same fold, at the settings that scored it
        left = json.loads((tmp_path / f"pl/fold{k}/metrics.json").read_text())["pseudo_left_out"]
        assert set(copies) <= set(left)  # the copies of training images, by name
        n = len(list(folder.rglob("*.png"))) - len(left)
        hw = next(f for f in source["folds"] if f["fold"] == k)["settings"]["head_weight"]
        assert (f"fold {k}: {n} pseudo-labelled test images from {trained_demo_run}/fold{k} (probability >= 0.0, "
                f"head weight {hw}, TTA True)") in out
    report = json.loads((tmp_path / "pl/report.json").read_text())
    added = report["pseudo_labels"]["added_per_fold_and_class"]
    assert set(added) == {"0", "1"} and all(sum(v.values()) > 0 for v in added.values())
    folds = __import__("pandas").read_csv(tmp_path / "pl/folds.csv")
    assert len(folds) == len(__import__("pandas").read_csv(trained_demo_run / "folds.csv"))  # never scored


@pytest.mark.parametrize("every,watched", [(0, [3]), (2, [2, 3]), (1, [1, 2, 3])])
def test_the_held_out_score_is_taken_every_n_epochs_and_after_the_last(fresh_accelerate_state, demo, every, watched):
    """train.monitor_every: the held-out embedding costs more than a small fold's train steps; the
    history keeps its columns, empty where no score was taken."""
    from entrep.data.folds import link_groups
    from entrep.data.images import decode_all
    from entrep.data.release import load_release
    from entrep.embedding import eval_loader
    from entrep.engine import FoldTrainer, make_accelerator
    from entrep.model.backbone import image_stats

    cfg = load_config(ROOT / "configs/demo.yaml", ["train.epochs=3", "train.batch_size=16",
                                                   f"train.monitor_every={every}"])
    labels = LabelSet.from_config(cfg.labels)
    df = load_release(demo, labels.names)[0].head(40).reset_index(drop=True)
    acc = make_accelerator(cfg, cpu=True)
    model = build_model(cfg, labels)
    pixels = decode_all(df["path"].tolist(), cfg.data.working_side(64))
    _, history = FoldTrainer(cfg, acc, labels).fit(model, pixels, df, np.arange(32), np.arange(32, 40),
                                                   link_groups(df), image_stats(model.base),
                                                   val_loader=eval_loader(pixels[32:], acc, 16))
    assert [r["epoch"] for r in history if "val_f1_macro" in r] == watched
    import pandas as pd

    assert "val_f1_macro" in pd.DataFrame(history).columns
