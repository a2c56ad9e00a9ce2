import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from entrep.config import load_config
from entrep.labels import LabelSet
from entrep.model.backbone import CONFIG_DIR, create_clip
from entrep.model.checkpoint import load_fold_weights, read_meta, save_weights
from entrep.model.entrep_clip import build_model


def _cfg(*overrides):
    return load_config(None, ["model.name=entrep-tiny", "model.pretrained=", "model.lora.rank=4",
                              "model.lora.alpha=8", "model.lora.dropout=0", *overrides])


def _model(*overrides):
    cfg = _cfg(*overrides)
    return build_model(cfg, LabelSet.from_config(cfg.labels))


def _perturb(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


X = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_fusion_starts_at_clips_own_image_embedding():
    m = _model().eval()
    ref = m.base.encode_image(X)
    fused = m.image_features(X)
    assert F.cosine_similarity(fused, ref).min() > 0.999
    assert m.fusion.weights[-1] > 0.9
    concat = _model("model.fusion.mode=concat").eval()
    assert torch.allclose(concat.image_features(X), concat.base.encode_image(X), atol=1e-5)


def test_fusion_off_is_exactly_encode_image():
    m = _model("model.fusion.enabled=false").eval()
    assert torch.equal(m.image_features(X), m.base.encode_image(X))


def test_fusion_levels_mean_something():
    m = _model().eval()
    assert m.levels == [2, 3, 4, 5]  # the last four of the tiny ViT's six blocks
    with torch.no_grad():
        m.fusion.level_logits.copy_(torch.tensor([8.0, 0, 0, 0]))
    assert F.cosine_similarity(m.image_features(X), m.base.encode_image(X)).max() < 0.99


def test_lora_targets_and_dead_out_proj_rejected():
    m = _model()
    lora_mods = [n for n, _ in m.named_modules() if n.endswith("lora_A")]
    for part in (".attn.", ".mlp.c_fc.", ".mlp.c_proj."):
        assert any("visual.transformer.resblocks.0" + part in n for n in lora_mods), part
    assert any(".transformer.resblocks" in n and "visual" not in n for n in lora_mods)  # text tower too
    no_text = _model("model.lora.text=false")
    assert all("visual" in n for n, _ in no_text.named_modules() if n.endswith("lora_A"))
    assert m.lora_counts == {"vision": 18, "text": 12} and no_text.lora_counts == {"vision": 18, "text": 0}
    with pytest.raises(ValueError, match="out_proj"):  # open_clip's MHA never calls out_proj: a dead adapter
        _model("model.lora.targets=[attn.out_proj]")


@pytest.mark.parametrize("attn", ["attn.in_proj_weight", "attn"])
def test_every_trainable_parameter_learns_and_frozen_ones_do_not(attn):
    torch.manual_seed(0)
    m = _model(f"model.lora.targets=[{attn}, mlp.c_fc, mlp.c_proj]").train()
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    assert any("lora_A" in n for n in trainable) and "logit_scale" in trainable and "head.weight" in trainable
    assert not any(n.startswith("clip.") and "lora_" not in n for n in trainable)  # the base stays frozen
    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    tokens = m.tokenize(["a polyp", "erythema", "white discharge"])
    for step in range(2):
        opt.zero_grad()
        out = m(X, tokens)
        loss = (F.cross_entropy(out["head_logits"], torch.tensor([0, 1, 2]))
                + F.cross_entropy(out["prompt_logits"], torch.tensor([0, 1, 2]))
                + F.cross_entropy(m.scale() * out["emb"] @ out["text_emb"].t(), torch.arange(3)))
        loss.backward()
        if step == 0:  # B starts at zero, so A gets exactly no gradient on the first backward
            assert all(p.grad is not None and p.grad.abs().sum() == 0 for n, p in trainable.items() if "lora_A" in n)
        opt.step()
    dead = [n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []
    changed = [n for n, p in m.named_parameters() if n in frozen and not torch.equal(p, frozen[n])]
    if attn == "attn":  # peft's MHA layer merges/unmerges in place: the base drifts by rounding only
        assert all((dict(m.named_parameters())[n] - frozen[n]).abs().max() < 1e-6 for n in changed)
    else:
        assert changed == []


def test_save_reload_is_bit_identical_and_records_peft_version(tmp_path):
    import peft

    m = _model()
    _perturb(m)
    m.eval()
    with torch.inference_mode():
        ref = m(X)
    save_weights(m, tmp_path / "fold0", {"model_name": "entrep-tiny"})
    assert (tmp_path / "fold0/adapter/adapter_model.safetensors").is_file()
    assert read_meta(tmp_path / "fold0")["peft_version"] == peft.__version__
    kit = (tmp_path / "fold0/kit.safetensors").stat().st_size
    assert kit < 100_000  # the kit's modules only, never a copy of the backbone
    fresh = _model()
    load_fold_weights(fresh, tmp_path / "fold0", "fold0")
    with torch.inference_mode():
        out = fresh(X)
    for key in ("head_logits", "prompt_logits", "emb"):
        assert torch.equal(out[key], ref[key]), key


def test_several_folds_on_one_base(tmp_path):
    refs = []
    for k in range(2):
        m = _model()
        _perturb(m, seed=k)
        m.eval()
        with torch.inference_mode():
            refs.append(m(X)["emb"])
        save_weights(m, tmp_path / f"fold{k}", {})
    base = _model()
    for k in (0, 1, 0):
        load_fold_weights(base, tmp_path / f"fold{k}", f"fold{k}")
        with torch.inference_mode():
            assert torch.equal(base(X)["emb"], refs[k])


def test_class_prompt_cache():
    m = _model()
    m.eval()
    a = m.class_embeddings()
    assert m.class_embeddings() is a  # eval: cached
    assert a.shape == (7, m.embed_dim) and torch.allclose(a.norm(dim=-1), torch.ones(7))
    m.train()
    assert m.class_embeddings() is not m.class_embeddings()  # text LoRA trains: recomputed
    frozen_text = _model("model.lora.text=false").train()
    assert frozen_text.class_embeddings() is frozen_text.class_embeddings()


def test_class_embedding_is_normalised_mean_of_prompts():
    m = _model().eval()
    prompts = m.labels.prompts["vc-open"]
    e = m.encode_text(m.tokenize(list(prompts)))
    assert torch.allclose(m.class_embeddings()[4], F.normalize(e.mean(0), dim=0), atol=1e-6)


def test_long_caption_is_truncated_not_an_error():
    m = _model().eval()
    long = " ".join(["edema and erythema of the arytenoid cartilages"] * 20)
    tokens = m.tokenize([long])
    assert tokens.shape == (1, 32)
    emb = m.encode_text(tokens)
    assert torch.isfinite(emb).all()
    assert torch.equal(emb, m.encode_text(m.tokenize([" ".join(long.split()[:40])])))


def test_file_loaded_model_keeps_quickgelu_and_reloads_identically(tmp_path):
    from open_clip.transformer import QuickGELU
    from safetensors.torch import save_file

    src, _ = create_clip("entrep-tiny")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)
    save_file(src.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    loaded, _ = create_clip("entrep-tiny", str(tmp_path / "open_clip_model.safetensors"))
    acts = [b.mlp.gelu for b in loaded.visual.transformer.resblocks]
    assert all(isinstance(a, QuickGELU) for a in acts)
    src.eval(), loaded.eval()
    assert torch.equal(loaded.encode_image(X), src.encode_image(X))
    # local-dir: open_clip_config.json + weights, as a Kaggle dataset would hold them
    cfg = json.loads((CONFIG_DIR / "entrep-tiny.json").read_text())
    cfg.pop("quick_gelu")  # a config file that forgets QuickGELU: the model name still forces it
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    from_dir, _ = create_clip("entrep-tiny-quickgelu", f"local-dir:{tmp_path}")
    assert all(isinstance(b.mlp.gelu, QuickGELU) for b in from_dir.visual.transformer.resblocks)
    from_dir.eval()
    assert torch.equal(from_dir.encode_image(X), src.encode_image(X))


def test_offline_tag_fails_fast_with_a_hint(tmp_path):
    code = ("from entrep.model.backbone import create_clip\n"
            "create_clip('ViT-B-16-quickgelu', 'openai', offline=True)\n")
    env = dict(os.environ, HF_HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path))
    env.pop("HF_HUB_OFFLINE", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode != 0
    assert "WeightsError" in r.stderr and "model.pretrained=/path/to/open_clip_model.safetensors" in r.stderr
    assert "local-dir:" in r.stderr


def test_unknown_weights_value_is_a_clear_error():
    with pytest.raises(Exception, match="neither a file nor an open_clip tag"):
        create_clip("entrep-tiny", "/no/such/file.safetensors")


def test_merged_lora_inference_matches_unmerged(tmp_path):
    from entrep.model.lora import merged

    m = _model()
    _perturb(m)
    save_weights(m, tmp_path / "fold0", {})
    base = _model()
    load_fold_weights(base, tmp_path / "fold0", "fold0")
    with torch.inference_mode():
        ref = base(X)["emb"]
        with merged(base.clip):
            fast = base(X)["emb"]
        after = base(X)["emb"]
    assert torch.allclose(fast, ref, atol=1e-5) and torch.allclose(after, ref, atol=1e-5)
    lora_b = [p for n, p in base.named_parameters() if "lora_B.fold0" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the comparison involved real adapters


@pytest.mark.parametrize("name,patch", [("entrep-tiny", 8), ("entrep-tiny-sig", 8), ("entrep-tiny-eva", 8),
                                        ("timm:test_vit", 16)])
def test_a_vit_input_side_that_is_not_whole_patches_is_one_line(name, patch):
    """timm asserts in the first forward pass (the Track 1 size 380 on a /16 ViT), and open_clip's stride
    silently drops the last pixels: both refused when the model is built, with the nearest sides."""
    from entrep.model.backbone import WeightsError, create_clip, patch_side

    side = 12 * patch + patch // 2
    with pytest.raises(WeightsError) as e:
        create_clip(name, image_size=side)
    assert str(e.value) == (f"model.image_size={side} is not a multiple of the {patch} px patches of '{name}'; use "
                            f"{12 * patch} or {13 * patch}")
    assert patch_side(create_clip(name, image_size=12 * patch)[0].visual) == patch


def test_a_cnn_takes_any_input_side():
    from entrep.model.backbone import create_clip, patch_side

    model, _ = create_clip("entrep-tiny-convnext", image_size=100)
    assert patch_side(model.visual) is None
