"""timm image-only members (model.name=timm:<name>): the kit's head, fusion, LoRA or full fine-tuning on a
timm backbone; classification and i2i only, and a blend takes its t2i from the members with text."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from entrep.config import load_config
from entrep.errors import EntrepError
from entrep.labels import LabelSet
from entrep.model.entrep_clip import build_model

ROOT = Path(__file__).parents[1]
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _model(name="timm:test_efficientnet", *overrides):
    cfg = load_config(ROOT / "configs/demo.yaml", [f"model.name={name}", "model.image_size=64", *overrides])
    return build_model(cfg, LabelSet.from_config(cfg.labels))


@pytest.mark.parametrize("name", ["timm:test_efficientnet", "timm:test_resnet", "timm:test_convnext",
                                  "timm:test_vit"])
def test_a_timm_member_builds_with_vision_adapters_and_starts_at_its_own_embedding(name):
    m = _model(name).eval()
    assert not m.has_text and not m.uses_prompts and m.lora_counts["vision"] > 0 and m.lora_counts["text"] == 0
    assert m.base.visual.image_size == (64, 64)
    cos = F.cosine_similarity(m.image_features(X), m.base.encode_image(X))
    assert cos.min() > 0.999
    out = m(X)
    assert set(out) == {"features", "emb", "head_logits", "scale"}  # no prompt logits, no text


def test_one_step_trains_the_adapters_and_full_finetuning_trains_the_whole_net():
    from accelerate import Accelerator

    from entrep.engine import train_loss

    for overrides, trained in ((), "lora"), (("model.lora.enabled=false", "model.lora.train_last_blocks=-1"), "all"):
        cfg = load_config(ROOT / "configs/demo.yaml", ["model.name=timm:test_efficientnet", "model.image_size=64",
                                                      *overrides])
        torch.manual_seed(0)
        m = build_model(cfg, LabelSet.from_config(cfg.labels)).train()
        batch = {"image": X, "y": torch.tensor([0, 1]), "group": torch.tensor([0, 0]),
                 "all_captions": [["a polyp"], []]}
        loss, parts = train_loss(m, batch, cfg, Accelerator(cpu=True))
        loss.backward()
        assert set(parts) == {"ce", "image"}  # the caption and prompt losses do not apply
        grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        if trained == "all":
            assert all(p.requires_grad for p in m.base.visual.parameters())
            assert any("trunk.conv_stem" in n for n in grads)
        else:
            assert any("lora_" in n for n, p in m.named_parameters() if p.requires_grad)
            assert not any(p.requires_grad for n, p in m.base.named_parameters() if "lora_" not in n)


def test_text_only_settings_are_named_once_not_refused(caplog):
    from entrep.model import entrep_clip

    entrep_clip._SAID.discard("timm:test_resnet")
    with caplog.at_level(logging.WARNING, logger="entrep.model"):
        _model("timm:test_resnet")
        _model("timm:test_resnet")
    said = [r.getMessage() for r in caplog.records if "no text tower" in r.getMessage()]
    assert len(said) == 1 and "model.prompts" in said[0] and "loss.text" in said[0]


def test_weights_from_a_file_load_and_a_wrong_or_unknown_model_is_one_line(tmp_path):
    from safetensors.torch import save_file

    src = _model("timm:test_efficientnet", "model.lora.enabled=false")
    with torch.no_grad():
        for p in src.base.visual.trunk.parameters():
            p.add_(0.01)  # weights that differ from the seeded random init
    save_file({k: v.contiguous() for k, v in src.base.visual.trunk.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = _model("timm:test_efficientnet", "model.lora.enabled=false", f"model.pretrained={tmp_path}/w.safetensors")
    torch.testing.assert_close(loaded.base.eval().encode_image(X), src.base.eval().encode_image(X), rtol=0, atol=0)
    with pytest.raises(EntrepError, match="do not fit"):
        _model("timm:test_resnet", f"model.pretrained={tmp_path}/w.safetensors")
    with pytest.raises(EntrepError, match="timm has no model 'no_such_net'"):
        _model("timm:no_such_net")


def test_a_timm_family_without_a_record_is_refused_in_one_line():
    with pytest.raises(EntrepError) as e:
        _model("timm:test_nfnet")
    assert "does not know the vision tower" in str(e.value) and "\n" not in str(e.value)


def _run(*args, cwd=ROOT):
    r = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, COLUMNS="200"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.mark.slow
def test_a_timm_run_blends_with_a_clip_run_and_the_blend_submits_three_tracks(demo, trained_demo_run, tmp_path):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(trained_demo_run, runs / "clip")
    out = _run("train.py", "--name", "cnn", "--config", "configs/demo.yaml", "cv.n_splits=2", "train.epochs=1",
               "--data", demo, f"output_dir={runs}", "model.name=timm:test_efficientnet", "model.image_size=64",
               f"cv.folds_from={runs / 'clip'}")
    assert "no text tower" in out
    report = json.loads((runs / "cnn/report.json").read_text())
    assert report["t2i"]["n_queries"] == 0 and report["i2i"]["n_queries"] > 0
    _run("-m", "entrep.blend", "--runs", runs / "clip", runs / "cnn", "--name", "mix")
    weights = json.loads((runs / "mix/tuned.json").read_text())["weights"]
    assert weights["t2i"][1] == 0.0 and weights["t2i"][0] == 1.0  # the t2i part comes from the CLIP member
    for run in ("mix", "cnn"):
        _run("infer.py", "--run", runs / run, "--data", demo / "test")
        _run("submit.py", "--run", runs / run)
    assert {p.name for p in (runs / "mix/submission").glob("*.zip")} == {"cls.zip", "i2i.zip", "t2i.zip"}
    assert {p.name for p in (runs / "cnn/submission").glob("*.zip")} == {"cls.zip", "i2i.zip"}
    meta = json.loads((runs / "cnn/predictions/meta.json").read_text())
    assert meta["queries"]["t2i"] is None and "no text tower" in meta["not_predicted"]["t2i"]
    t2i = json.loads((runs / "mix/submission/t2i.json").read_text())
    assert len(t2i) == len((demo / "test/t2i.csv").read_text().splitlines())


def test_an_image_only_member_with_only_text_side_losses_is_refused_at_build():
    """loss.ce=0 loss.image=0 on a timm member: its prompt and text losses do not apply, so nothing trains."""
    from entrep.config import ConfigError

    with pytest.raises(ConfigError, match="no text tower, so loss.prompt and loss.text do not apply"):
        _model("timm:test_resnet", "loss.ce=0", "loss.image=0")
    _model("timm:test_resnet", "loss.ce=0")  # its image loss still trains it
