"""Every file in configs/ and the default Config() is a tested config: built with random weights at
its own architecture and input size, one real optimizer step through the trainer's step code,
two images embedded for evaluation, and the fold weights saved and reloaded bit-identically.
The tiny demo config runs in the fast tier; the real-size ones (one per family the configs ship:
ViT-B/16, ViT-L/14, EVA02, SigLIP, ConvNeXt, a timm CNN at 384 px) in the slow tier."""
from pathlib import Path

import numpy as np
import pytest
import torch

from entrep.config import ConfigError, load_config

ROOT = Path(__file__).parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
FAST = {"demo.yaml"}


@pytest.fixture()
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def shipped(name: str, *overrides: str):
    """The config as shipped; only the weights (random: no network) and the loader workers differ."""
    path = None if name == "Config()" else ROOT / "configs" / name
    return load_config(path, ["model.pretrained=", "data.num_workers=0", *overrides])


def _trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _saved_state(model, adapter: str) -> dict:
    """What a fold's files hold, keyed without the adapter name: peft's adapter state + the kit's tensors."""
    from peft import get_peft_model_state_dict

    state = {f"kit.{k}": v for k, v in model.kit_state_dict().items()}
    if hasattr(model.clip, "peft_config"):
        state |= {f"lora.{k}": v for k, v in get_peft_model_state_dict(model.clip, adapter_name=adapter).items()}
    return state


def test_every_config_file_is_listed():
    assert {"entrep_vitb16.yaml", "demo.yaml", "vitl14.yaml", "eva02_b16.yaml", "siglip_b16.yaml",
            "convnext_base.yaml", "timm_cls.yaml"} <= set(CONFIGS)


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in [*CONFIGS, "Config()"]])
def test_shipped_config_builds_steps_embeds_and_reloads(name, tmp_path, fresh_accelerate_state, local_tokenizer):
    from entrep.data.dataset import TrainDataset
    from entrep.embedding import embed_images
    from entrep.engine import TrainStep, make_accelerator
    from entrep.labels import LabelSet
    from entrep.model.backbone import image_stats
    from entrep.model.checkpoint import load_fold_weights, save_weights
    from entrep.model.entrep_clip import build_model

    # a tokenizer that lives on the hub comes from a local folder, as a user without network gives it
    hub_tokenizer = name != "Config()" and "SigLIP" in load_config(ROOT / "configs" / name).model.name
    cfg = shipped(name, "train.batch_size=2", "train.eval_batch_size=2", "train.epochs=1",
                  *([f"model.tokenizer=local-dir:{local_tokenizer}"] if hub_tokenizer else []))
    labels = LabelSet.from_config(cfg.labels)
    torch.manual_seed(0)
    model = build_model(cfg, labels)
    mean, std, size = image_stats(model.base)
    assert model.base.visual.image_size in (size, (size, size))
    if cfg.model.image_size:
        assert size == cfg.model.image_size  # the config's own input side, e.g. timm_cls.yaml at 384 px
    work = cfg.data.working_side(size)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, work, work, 3), dtype=np.uint8)
    captions = [["erythema of the left vocal fold"], [], ["a normal nasal cavity"], []]
    ds = TrainDataset(pixels, y=np.array([0, 1, 2, -1]), captions=captions, groups=np.array([0, 0, -1, -1]),
                      index=np.arange(4), labels=labels, hflip=cfg.train.hflip)
    acc = make_accelerator(cfg, cpu=True)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = _trainable(model)
    step = TrainStep.for_dataset(cfg, acc, model, ds, image_stats(model.base))
    step.model.train()
    loss, parts = step(next(iter(step.loader)))
    assert np.isfinite(loss) and parts
    m = step.unwrapped
    changed = [n for n, p in _trainable(m).items() if not torch.equal(p, trainable_before[n])]
    assert changed, "one optimizer step changed no trainable parameter"
    assert all(torch.equal(p, base_before[n]) for n, p in m.named_parameters() if not p.requires_grad)

    emb = embed_images(step.model, pixels[:2], acc, labels, image_stats(m.base), tta_flip=cfg.infer.tta_flip)
    assert emb.emb.shape == (2, m.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(emb.emb, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(emb.probs(0.5, cfg.infer.tta_flip).sum(1), 1, atol=1e-5)

    save_weights(m, tmp_path / "fold0", {"fold": 0, "model_name": cfg.model.name, "labels": list(labels.names)})
    saved = _saved_state(m, "default")
    reloaded = build_model(cfg, labels)
    load_fold_weights(reloaded, tmp_path / "fold0", "fold0")
    again = _saved_state(reloaded, "fold0")
    assert saved.keys() == again.keys()
    assert all(torch.equal(saved[k], again[k]) for k in saved), "fold weights did not reload bit-identically"
    with torch.inference_mode():
        x = torch.randn(2, 3, size, size)
        torch.testing.assert_close(m.eval()(x)["emb"], reloaded.eval()(x)["emb"], rtol=0, atol=0)


def test_lora_dropout_on_a_parameter_target_is_refused_with_the_fix():
    # an explicit parameter target: refused by validation
    with pytest.raises(ConfigError, match=r"model\.lora\.dropout.*model\.lora\.dropout=0"):
        load_config(ROOT / "configs/entrep_vitb16.yaml",
                    ["model.lora.dropout=0.1", "model.lora.targets=[attn.in_proj_weight,mlp.c_fc]"])
    # targets: auto, whose open_clip ViT preset holds attn.in_proj_weight: refused when the model is built
    from entrep.labels import LabelSet
    from entrep.model.entrep_clip import build_model

    cfg = shipped("demo.yaml", "model.lora.dropout=0.1")
    with pytest.raises(ConfigError, match=r"model\.lora\.dropout.*model\.lora\.dropout=0"):
        build_model(cfg, LabelSet.from_config(cfg.labels))


def test_lora_dropout_on_module_targets_builds_and_is_used():
    """Dropout means peft's lora_dropout on module targets: a training forward is stochastic."""
    from entrep.labels import LabelSet
    from entrep.model.entrep_clip import build_model

    cfg = shipped("demo.yaml", "model.lora.dropout=0.5", "model.lora.targets=[attn,mlp.c_fc,mlp.c_proj]")
    model = build_model(cfg, LabelSet.from_config(cfg.labels))
    with torch.no_grad():  # B starts at 0: give the adapters weight so dropout shows in the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    assert not torch.equal(model(x)["emb"], model(x)["emb"])
    model.eval()
    assert torch.equal(model(x)["emb"], model(x)["emb"])


@pytest.mark.parametrize("override, key", [
    ("model.lora.rank=0", "model.lora.rank"), ("model.lora.alpha=0", "model.lora.alpha"),
    ("model.lora.dropout=1.0", "model.lora.dropout"), ("model.lora.targets=[]", "model.lora.targets"),
])
def test_lora_settings_peft_would_refuse_are_refused_by_validation(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ROOT / "configs/demo.yaml", [override])


def test_fusion_layers_beyond_the_architecture_are_a_config_error():
    from entrep.labels import LabelSet
    from entrep.model.entrep_clip import build_model

    cfg = shipped("demo.yaml", "model.fusion.layers=[-40,-1]")
    with pytest.raises(ConfigError, match="model.fusion.layers"):
        build_model(cfg, LabelSet.from_config(cfg.labels))


def test_grad_checkpointing_keeps_loss_and_gradients(fresh_accelerate_state):
    """train.grad_checkpointing recomputes activations in backward: same loss, same gradients."""
    from accelerate import Accelerator

    from entrep.engine import train_loss
    from entrep.labels import LabelSet
    from entrep.model.entrep_clip import build_model

    results = []
    for ckpt in (False, True):
        cfg = shipped("demo.yaml", f"train.grad_checkpointing={str(ckpt).lower()}")
        labels = LabelSet.from_config(cfg.labels)
        torch.manual_seed(0)  # LoRA A and the head are drawn at build
        model = build_model(cfg, labels).train()
        assert model.base.visual.transformer.grad_checkpointing is ckpt and model.base.transformer.grad_checkpointing is ckpt
        g = torch.Generator().manual_seed(1)
        batch = {"image": torch.randn(4, 3, 64, 64, generator=g), "y": torch.tensor([0, 1, 2, 3]),
                 "group": torch.tensor([-1, -1, 0, 0]), "all_captions": [["a left ear"], [], ["a throat"], []]}
        acc = Accelerator(cpu=True)
        torch.manual_seed(5)  # the slerp views' random t
        loss, _ = train_loss(model, batch, cfg, acc)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and any("lora_" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)
