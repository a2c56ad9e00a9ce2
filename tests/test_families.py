"""Tower families (entrep/model/families.py): each tiny family config builds with LoRA auto in both towers,
starts at CLIP's own image embedding, trains every trainable tensor and nothing else, and reloads
bit-identically; zero-adapter towers, unknown towers and tokenizers that cannot load are one-line errors.
Slow: one member of every open_clip family at full size, random weights, one train step (or a one-line
refusal naming what is missing), and every name of open_clip.list_models() maps to a known family."""
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import train_tokenizer
import torch.nn.functional as F

from entrep.config import ConfigError, load_config
from entrep.errors import EntrepError
from entrep.labels import LabelSet
from entrep.losses import caption_targets, joint_loss, multi_positive_sigmoid
from entrep.model.entrep_clip import build_model

# tiny config -> (vision record, text record)
TINY = {
    "entrep-tiny": ("openclip-vit-cls", "openclip-text-root"),
    "entrep-tiny-coca": ("openclip-vit-pooled", "openclip-text"),
    "entrep-tiny-timm-vit": ("timm-vit-cls", "openclip-text-root"),
    "entrep-tiny-sig": ("timm-vit-pooled", "openclip-text"),
    "entrep-tiny-eva": ("timm-eva-cls", "openclip-text"),
    "entrep-tiny-convnext": ("timm-convnext", "openclip-text-root"),
    "entrep-tiny-fastvit": ("timm-fastvit", "openclip-text"),
    "entrep-tiny-rn": ("openclip-resnet", "openclip-text-root"),
}
CAPTIONS = ["a polyp on the left vocal fold", "erythema of the right nasal cavity", "white discharge",
            "open vocal cords", "superior septal deviation", "an endoscopic view of the nasopharynx",
            "edema and erythema of the arytenoid cartilages", "a normal ear canal"]
X = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _cfg(name, *overrides):
    return load_config(None, [f"model.name={name}", "model.pretrained=", "model.lora.rank=4", "model.lora.alpha=8",
                              *overrides])


def _model(name, *overrides):
    cfg = _cfg(name, *overrides)
    return build_model(cfg, LabelSet.from_config(cfg.labels))


def _one_line(e: BaseException) -> str:
    msg = str(e.value if hasattr(e, "value") else e)
    assert isinstance(e.value if hasattr(e, "value") else e, EntrepError) and "\n" not in msg, msg
    return msg


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, with NaN equal to NaN: open_clip leaves CoCa's unused text_decoder.text_projection as
    torch.empty, whose memory may hold NaNs."""
    return torch.equal(a, b) or (a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all()))


def _loss(m, x, y):
    """The kit's joint objective on one batch (captions, prompts, image SupCon; sigmoid where the model says)."""
    captions = [[CAPTIONS[i % len(CAPTIONS)]] for i in range(len(y))]
    unique, pos = caption_targets(captions)
    out = m(x, m.tokenize(unique))
    cfg = _cfg("entrep-tiny").loss
    return joint_loss(out, y, torch.full_like(y, -1), out["text_emb"], pos, out["scale"], cfg)[0]


# ---------------------------------------------------------------------------------------------- fast tier
@pytest.mark.parametrize("name", TINY)
def test_tiny_family_builds_with_auto_lora_in_both_towers(name):
    m = _model(name)
    fam = m.family
    assert (fam.vision.name, fam.text.name) == TINY[name]
    counts = m.lora_counts
    assert counts["vision"] > 0 and counts["text"] > 0, counts
    adapted = [n[:-len(".lora_A")] for n, _ in m.base.named_modules() if n.endswith(".lora_A")]
    inside = re.compile(rf"({fam.vision.blocks}|{fam.text.blocks})\..+")
    assert all(inside.fullmatch(n) for n in adapted), adapted
    no_text = _model(name, "model.lora.text=false")
    assert no_text.lora_counts == {"vision": counts["vision"], "text": 0}
    assert not no_text.text_trainable and m.text_trainable


@pytest.mark.parametrize("name", TINY)
def test_step0_fused_embedding_is_clips_own_and_fusion_off_is_encode_image(name):
    for mode in ("softmax", "concat"):
        m = _model(name, f"model.fusion.mode={mode}").eval()
        with torch.no_grad():
            fused, ref = m.image_features(X), m.base.encode_image(X)
        assert F.cosine_similarity(fused, ref).min() >= 0.999, (mode, F.cosine_similarity(fused, ref))
        unit = F.normalize(ref, dim=-1)  # CoCa's encode_image normalises; the others do not
        if mode == "concat":
            torch.testing.assert_close(F.normalize(fused, dim=-1), unit, rtol=0, atol=1e-5)
        # the last level is exactly the tower's own embedding
        with torch.no_grad():
            levels = m.level_features(X)
        assert levels.shape == (3, len(m.levels), m.embed_dim)
        torch.testing.assert_close(F.normalize(levels[:, -1], dim=-1), unit, rtol=0, atol=1e-5)
    off = _model(name, "model.fusion.enabled=false").eval()
    with torch.no_grad():
        assert torch.equal(off.image_features(X), off.base.encode_image(X))


@pytest.mark.parametrize("name", TINY)
def test_one_step_trains_every_trainable_tensor_and_leaves_the_base(name):
    torch.manual_seed(0)
    m = _model(name).train()
    with torch.no_grad():  # open_clip's random init zeroes each ResNet block's last BatchNorm gamma, which
        for mod in m.base.modules():  # silences the block's branch (and its adapters) until trained
            if isinstance(mod, torch.nn.BatchNorm2d) and not mod.weight.any():
                mod.weight.fill_(1.0)
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    base = {n: t.detach().clone() for n, t in m.state_dict().items() if n.startswith("clip.") and "lora_" not in n}
    assert not any(n.startswith("clip.") and "lora_" not in n for n in trainable)  # the base stays frozen
    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    y = torch.tensor([0, 1, 2])
    for step in range(2):  # B starts at zero: A gets its first gradient on the second backward
        opt.zero_grad()
        _loss(m, X, y).backward()
        opt.step()
    dead = [n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []
    after = m.state_dict()
    changed = [n for n, t in base.items() if not _same_bits(after[n], t)]  # weights and buffers (BatchNorm stats)
    assert changed == []


@pytest.mark.parametrize("name", TINY)
def test_save_and_reload_is_bit_identical(name, tmp_path):
    from entrep.model.checkpoint import load_fold_weights, save_weights

    m = _model(name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    m.eval()
    with torch.inference_mode():
        ref = m(X, m.tokenize(CAPTIONS[:2]))
    save_weights(m, tmp_path / "fold0", {"model_name": name})
    fresh = _model(name)
    load_fold_weights(fresh, tmp_path / "fold0", "fold0")
    with torch.inference_mode():
        out = fresh(X, fresh.tokenize(CAPTIONS[:2]))
    assert out.keys() == ref.keys()
    for key in ref:
        assert torch.equal(out[key], ref[key]), key


def test_zero_adapter_tower_is_refused_in_one_line():
    # the open_clip ViT names match the text tower of a ConvNeXt CLIP but nothing in its vision tower
    with pytest.raises(ConfigError) as e:
        _model("entrep-tiny-convnext", "model.lora.targets=[attn.in_proj_weight,mlp.c_fc,mlp.c_proj]")
    assert "vision tower" in _one_line(e) and "timm-convnext" in str(e.value)
    # timm names adapt the SigLIP-style vision tower but nothing in its open_clip text tower
    with pytest.raises(ConfigError) as e:
        _model("entrep-tiny-sig", "model.lora.targets=[attn.qkv,mlp.fc1]")
    assert "text tower" in _one_line(e) and "model.lora.text=false" in str(e.value)
    m = _model("entrep-tiny-sig", "model.lora.targets=[attn.qkv,mlp.fc1]", "model.lora.text=false")
    assert m.lora_counts == {"vision": 8, "text": 0}  # 4 blocks x 2 explicit targets, in the vision blocks only


def test_dead_out_proj_of_multihead_attention_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="out_proj") as e:
        _model("entrep-tiny", "model.lora.targets=[attn.out_proj]")
    _one_line(e)


def test_dropout_on_a_preset_with_parameter_targets_is_refused_at_build():
    with pytest.raises(ConfigError, match=r"model\.lora\.dropout.*model\.lora\.dropout=0") as e:
        _model("entrep-tiny", "model.lora.dropout=0.1")
    _one_line(e)
    eva = _model("entrep-tiny-eva", "model.lora.dropout=0.1", "model.lora.text=false")  # a module-only preset
    assert eva.lora_counts["vision"] > 0


def test_unknown_tower_family_is_refused_in_one_line(monkeypatch):
    from torch import nn

    from entrep.model import backbone

    class MysteryTower(nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    real = backbone.create_clip

    def fake(*args, **kwargs):
        clip, tok = real(*args, **kwargs)
        clip.visual = MysteryTower()
        return clip, tok

    monkeypatch.setattr(backbone, "create_clip", fake)
    with pytest.raises(EntrepError) as e:
        _model("entrep-tiny")
    msg = _one_line(e)
    assert "MysteryTower" in msg and "'entrep-tiny'" in msg and "no family names where its blocks live" in msg


def test_fusion_layers_outside_the_levels_name_the_family():
    with pytest.raises(ConfigError, match=r"model\.fusion\.layers \[-9, -1\] outside the 5 stages of openclip-resnet"):
        _model("entrep-tiny-rn", "model.fusion.layers=[-9,-1]")
    assert _model("entrep-tiny-rn", "model.fusion.layers=[0,-1]").levels == [0, 4]  # the stem is level 0


def test_train_last_blocks_unfreezes_the_familys_last_blocks_and_head():
    m = _model("entrep-tiny-convnext", "model.lora.enabled=false", "model.lora.train_last_blocks=1")
    trainable = {n for n, p in m.base.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("visual.trunk.stages.3.blocks.1.", "visual.trunk.head.", "visual.head."))
                             for n in trainable), sorted(trainable)
    assert any(n.startswith("visual.head.") for n in trainable)


def test_sigmoid_loss_separates_pairs_and_trains_the_bias():
    emb = F.normalize(torch.eye(4, 8), dim=-1)
    pos = torch.eye(4, dtype=torch.bool)
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0, requires_grad=True)
    good = multi_positive_sigmoid(emb, emb, pos, scale, bias)
    bad = multi_positive_sigmoid(emb, emb.roll(1, 0), pos, scale, bias)
    assert good < 0.05 < 5 < bad
    good.backward()
    assert bias.grad is not None and bias.grad != 0
    # shared captions: one column, positive for every image that carries it
    shared = multi_positive_sigmoid(emb[[0, 0]], emb[:1], torch.ones(2, 1, dtype=torch.bool), scale, bias)
    assert shared < 0.01


def test_sigmoid_family_trains_its_bias_through_the_forward():
    m = _model("entrep-tiny-sig").train()
    assert m.contrastive == "sigmoid" and m.logit_scale_max is None
    assert m.logit_bias.item() == -10.0  # copied from the base (the config's init_logit_bias)
    out = m(X, m.tokenize(CAPTIONS[:3]))
    assert "bias" in out
    _loss(m, X, torch.tensor([0, 1, 2])).backward()
    assert m.logit_bias.grad is not None and m.logit_bias.grad.abs() > 0
    with torch.no_grad():
        m.logit_scale.fill_(5.0)
    assert m.scale().item() == pytest.approx(torch.exp(torch.tensor(5.0)).item())  # SigLIP: no clamp at 100
    clip = _model("entrep-tiny")
    assert clip.contrastive == "softmax" and clip.logit_bias is None and "bias" not in clip(X)
    with torch.no_grad():
        clip.logit_scale.fill_(5.0)
    assert clip.scale().item() == pytest.approx(100.0)  # CLIP: clamped at log(100)
    forced = _model("entrep-tiny", "loss.contrastive=sigmoid")
    assert forced.logit_bias.item() == -10.0 and "bias" in forced(X)  # SigLIP's init for a base without one
    assert _model("entrep-tiny-sig", "loss.contrastive=softmax").logit_bias is None


def _train_tokenizer(folder: Path, vocab: int = 200):
    return train_tokenizer(folder, CAPTIONS, vocab)


def test_tokenizer_from_a_local_folder_and_one_line_when_missing(tmp_path, monkeypatch):
    from entrep.model.backbone import TokenizerError, check_tokenizer

    fast = _train_tokenizer(tmp_path / "tok")
    m = _model("entrep-tiny-sig", f"model.tokenizer=local-dir:{tmp_path / 'tok'}")
    tokens = m.tokenize(CAPTIONS[:2])
    assert tokens.shape == (2, 32) and int(tokens.max()) < len(fast)  # the model's context, the folder's vocabulary
    assert tokens[0, 0] == 2 and (tokens[0] == 3).any()  # [CLS] ... [SEP] from the folder's post-processor
    assert torch.isfinite(m.encode_text(tokens)).all()
    desc = check_tokenizer(_cfg("entrep-tiny-sig", f"model.tokenizer=local-dir:{tmp_path / 'tok'}"))
    assert "HFTokenizer" in desc and "vocabulary" in desc and "context 32" in desc
    with pytest.raises(TokenizerError) as e:
        check_tokenizer(_cfg("entrep-tiny-sig", f"model.tokenizer=local-dir:{tmp_path / 'nothing'}"))
    assert "model.tokenizer" in _one_line(e)
    with pytest.raises(TokenizerError) as e:
        _model("entrep-tiny-sig", f"model.tokenizer=local-dir:{tmp_path}")  # a folder without tokenizer files
    assert "model.tokenizer" in _one_line(e)
    # a tokenizer that lives on the hub, offline and not cached: one line, at once (no minute of retries)
    _empty_hub_cache(monkeypatch, tmp_path)
    with pytest.raises(TokenizerError) as e:
        check_tokenizer(_cfg("ViT-B-16-SigLIP", "model.offline=true"))
    msg = _one_line(e)
    assert "model.tokenizer" in msg and "timm/ViT-B-16-SigLIP" in msg and "local-dir:" in msg


def test_a_local_tokenizer_larger_than_the_text_vocabulary_is_refused(tmp_path):
    _train_tokenizer(tmp_path / "tok", vocab=400)
    cfg = json.loads((Path(__file__).parents[1] / "entrep/model/configs/entrep-tiny-sig.json").read_text())
    cfg["text_cfg"]["vocab_size"] = 100
    (tmp_path / "m").mkdir()
    (tmp_path / "m/open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    from safetensors.torch import save_file

    from entrep.model.backbone import _open_clip

    save_file(_open_clip().create_model(f"local-dir:{tmp_path / 'm'}").state_dict(),
              str(tmp_path / "m/open_clip_model.safetensors"))
    with pytest.raises(EntrepError, match=r"model\.tokenizer=.*token ids .*, but the text tower embeds 100") as e:
        _model("small-vocab", f"model.pretrained=local-dir:{tmp_path / 'm'}",
               f"model.tokenizer=local-dir:{tmp_path / 'tok'}")
    _one_line(e)
    # fewer tokens than the tower embeds, but one id past it: the largest id decides, not the count
    _train_tokenizer(tmp_path / "gap", vocab=60)
    spec = json.loads((tmp_path / "gap/tokenizer.json").read_text())
    assert len(spec["model"]["vocab"]) <= 60
    token = next(t for t, i in spec["model"]["vocab"].items() if i == max(spec["model"]["vocab"].values()))
    spec["model"]["vocab"][token] = 150
    (tmp_path / "gap/tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(EntrepError, match=r"token ids \(its largest is 150\), but the text tower embeds 100"):
        _model("small-vocab", f"model.pretrained=local-dir:{tmp_path / 'm'}",
               f"model.tokenizer=local-dir:{tmp_path / 'gap'}")


HF_TEXT = {  # transformers config -> the text record that adapts it
    "bert": ("BertConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=64), "hf-bert", "mean_pooler"),
    "mt5": ("MT5Config", dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0),
            "hf-t5", "mean_pooler"),
    "m2m100": ("M2M100Config", dict(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                                    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                    max_position_embeddings=64), "hf-m2m100", "cls_pooler"),
}


def hf_local_dir(folder: Path, arch: str) -> Path:
    """What a Kaggle dataset of an HF-text-tower CLIP holds: open_clip_config.json naming this folder as the
    text model and tokenizer, the HF config.json and tokenizer files, and open_clip weights (random here)."""
    import transformers
    from safetensors.torch import save_file

    from entrep.model.backbone import CONFIG_DIR, _open_clip

    folder.mkdir(parents=True)
    fast = _train_tokenizer(folder)
    cls, kwargs, _, pooler = HF_TEXT[arch]
    getattr(transformers, cls)(vocab_size=len(fast), pad_token_id=0, **kwargs).save_pretrained(folder)
    vision = json.loads((CONFIG_DIR / "entrep-tiny.json").read_text())["vision_cfg"]
    text = {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_pooler_type": pooler,
            "hf_proj_type": "linear", "context_length": 32}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 64, "quick_gelu": True,
                                                                            "vision_cfg": vision, "text_cfg": text}}))
    model = _open_clip().create_model(f"local-dir:{folder}", pretrained_text=False)
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.mark.parametrize("arch", ["bert", pytest.param("mt5", marks=pytest.mark.slow),
                                  pytest.param("m2m100", marks=pytest.mark.slow)])
def test_hf_text_tower_from_a_local_dir_adapts_and_trains(arch, tmp_path):
    folder = hf_local_dir(tmp_path / arch, arch)
    torch.manual_seed(0)
    m = _model(f"tiny-{arch}", f"model.pretrained=local-dir:{folder}").train()
    assert m.family.text.name == HF_TEXT[arch][2]
    assert m.lora_counts["vision"] > 0 and m.lora_counts["text"] > 0, m.lora_counts
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        _loss(m, X, torch.tensor([0, 1, 2])).backward()
        opt.step()
    assert [n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0] == []


def _empty_hub_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing is cached


def test_hf_text_tower_that_needs_the_hub_is_refused_in_one_line(tmp_path, monkeypatch):
    from entrep.model.backbone import WeightsError

    _empty_hub_cache(monkeypatch, tmp_path)
    with pytest.raises(WeightsError) as e:
        _model("roberta-ViT-B-32", "model.offline=true")
    msg = _one_line(e)
    assert "'roberta-base'" in msg and "config.json" in msg and "local-dir:" in msg
    from entrep.model.backbone import resolve_weights

    with pytest.raises(WeightsError, match="'roberta-base'"):  # preflight's weights check says it too
        resolve_weights("roberta-ViT-B-32", "", offline=True)


# ---------------------------------------------------------------------------------------------- slow tier
# One member per open_clip family, the smallest (or one that needs no hub) -> what a build needs
SMALLEST = {
    "ViT-S-32-alt": "",  # openclip-vit-cls + openclip-text-root
    "coca_ViT-B-32": "",  # openclip-vit-pooled (attention pool) + openclip-text (CoCa)
    "ViT-L-14-CLIPA": "tokenizer",  # openclip-vit-pooled (average pool); bert-base-uncased tokenizer on the hub
    "MobileCLIP-B": "",  # timm-vit-cls
    "vit_relpos_medium_patch16_cls_224": "",  # timm-vit-cls (relative position ViT)
    "ViT-B-16-SigLIP": "tokenizer",  # timm-vit-pooled (map), sigmoid; tokenizer on the hub
    "vit_medium_patch16_gap_256": "",  # timm-vit-pooled (average pool)
    "ViTamin-S": "",  # timm-vit-pooled (hybrid conv stem, GeGLU MLP)
    "EVA02-B-16": "",  # timm-eva-cls
    "PE-Core-T-16-384": "",  # timm-eva-pooled (map)
    "convnext_base": "",  # timm-convnext
    "MobileCLIP-S1": "",  # timm-fastvit
    "swin_base_patch4_window7_224": "",  # timm-swin
    "RN50": "",  # openclip-resnet
    "roberta-ViT-B-32": "hf",  # hf-bert: text config on the hub
    "mt5-base-ViT-B-32": "hf",  # hf-t5
    "nllb-clip-base": "hf",  # hf-m2m100
}


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALLEST)
def test_smallest_member_of_every_family_steps_or_is_refused_in_one_line(name, local_tokenizer, tmp_path,
                                                                         monkeypatch):
    from entrep.model.backbone import _open_clip, input_size
    from entrep.model.families import classify_config

    _empty_hub_cache(monkeypatch, tmp_path)  # and model.offline=true: the hub is out of reach
    needs = SMALLEST[name]
    if needs:
        with pytest.raises(EntrepError) as e:
            _model(name, "model.offline=true")
        msg = _one_line(e)
        assert ("model.tokenizer" if needs == "tokenizer" else "text_cfg.hf_model_name") in msg, msg
        if needs == "hf":
            return
    extra = [f"model.tokenizer=local-dir:{local_tokenizer}"] if needs == "tokenizer" else []
    torch.manual_seed(0)
    m = _model(name, "model.offline=true", *extra).train()
    candidates, text = classify_config(_open_clip().get_model_config(name))
    assert m.family.vision.name in candidates and m.family.text.name == text
    assert m.lora_counts["vision"] > 0 and m.lora_counts["text"] > 0, m.lora_counts
    side = input_size(name)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    trainable = [p for p in m.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    loss = _loss(m, x, torch.tensor([0, 1]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(p, b) for p, b in zip(trainable, before))
    m.eval()
    with torch.no_grad():
        cos = F.cosine_similarity(m.image_features(x), m.base.encode_image(x)).min()
    assert cos >= 0.99, cos  # random weights at full size (the tiny configs hold it to 0.999)


def test_every_open_clip_model_maps_to_a_known_family():
    """Fails when the installed open_clip adds a model whose towers no record knows."""
    import open_clip
    from open_clip.hf_configs import arch_dict

    from entrep.model.backbone import _open_clip
    from entrep.model.families import HF_ARCHS, TEXT, VISION, classify_config

    vision_names, text_names = {f.name for f in VISION}, {f.name for f in TEXT}
    builtin = [n for n in _open_clip().list_models() if not n.startswith("entrep-")]
    assert len(builtin) >= 144
    unknown, seen = [], set()
    for name in builtin:
        candidates, text = classify_config(open_clip.get_model_config(name))
        if not candidates or not set(candidates) <= vision_names or text not in text_names | {"hf"}:
            unknown.append((name, candidates, text))
        seen |= set(candidates) | {text}
    assert unknown == []
    assert set(arch_dict) <= set(HF_ARCHS) and set(HF_ARCHS.values()) <= text_names
    # every family is exercised: by a built member (slow tier) or a tiny config (fast tier)
    members = {v for n in SMALLEST for v in classify_config(open_clip.get_model_config(n))[0]}
    assert seen - {"hf"} <= members | {v for v, _ in TINY.values()} | {t for _, t in TINY.values()}
