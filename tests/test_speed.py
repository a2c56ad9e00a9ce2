"""The speed paths change speed only: batched augmentation geometry and colour, where it runs,
the token cache, and the channels_last / SDPA / compile options against the default outputs."""
import math

import numpy as np
import pytest
import torch

from entrep.config import load_config
from entrep.data.augment import BatchAugment
from entrep.data.dataset import TrainDataset
from entrep.engine import make_accelerator, train_pipeline
from entrep.labels import LabelSet
from entrep.model.entrep_clip import build_model

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def identity(n: int) -> dict:
    one, zero = torch.ones(n), torch.zeros(n)
    return {"w": one, "h": one, "cx": zero, "cy": zero, "angle": zero, "brightness": one, "contrast": one,
            "saturation": one, "hue": zero}


def normalised(u8: torch.Tensor) -> torch.Tensor:
    return (u8.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_identity_parameters_give_the_normalised_input():
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    out = BatchAugment(32, MEAN, STD)(x, identity(3))
    assert out.dtype == torch.float32 and out.shape == (3, 3, 32, 32)
    torch.testing.assert_close(out, normalised(x), atol=1e-5, rtol=0)


def test_crop_takes_the_named_quadrant_and_a_turn_moves_it():
    x = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    x[0, 0, 32:, 32:] = 255      # bottom-right quadrant red
    x[0, 2, :32, 32:] = 255      # top-right quadrant blue
    aug = BatchAugment(16, (0, 0, 0), (1, 1, 1))
    p = identity(1) | {"w": torch.tensor([0.5]), "h": torch.tensor([0.5]), "cx": torch.tensor([0.5]),
                       "cy": torch.tensor([0.5])}
    out = aug(x, p)[0]
    assert torch.allclose(out[0], torch.ones(16, 16)) and out[1:].abs().max() < 1e-6
    out = aug(x, p | {"cy": torch.tensor([-0.5])})[0]  # y = -0.5 is the top half
    assert torch.allclose(out[2], torch.ones(16, 16)) and out[:2].abs().max() < 1e-6
    # a 90 degree turn moves the coloured quadrants and, the image being square, loses none of them
    turned = aug(x, identity(1) | {"angle": torch.tensor([math.pi / 2])})[0]
    assert not torch.allclose(turned, aug(x, identity(1))[0]) and turned.sum(0).gt(1e-3).float().mean() == 0.5


def test_each_image_gets_its_own_parameters_within_the_ranges():
    aug = BatchAugment(32, MEAN, STD)
    p = aug.params(4000, torch.Generator().manual_seed(0))
    area = p["w"] * p["h"]
    unclamped = (p["w"] < 1) & (p["h"] < 1)
    assert area[unclamped].min() >= 0.7 - 1e-6 and area.max() <= 1 + 1e-6
    assert (p["cx"].abs() <= 1 - p["w"] + 1e-6).all() and (p["cy"].abs() <= 1 - p["h"] + 1e-6).all()
    assert p["angle"].abs().max() <= math.radians(10) and p["angle"].std() > 0.05
    for k, r in (("brightness", 0.2), ("contrast", 0.2), ("saturation", 0.15)):
        assert (p[k] - 1).abs().max() <= r and p[k].std() > r / 4
    x = torch.randint(0, 256, (1, 3, 48, 48), dtype=torch.uint8).repeat(2, 1, 1, 1)
    out = aug(x)
    assert not torch.allclose(out[0], out[1])  # one call, two different views of the same image


def test_colour_jitter():
    aug = BatchAugment(8, (0, 0, 0), (1, 1, 1))
    gray = torch.full((1, 3, 8, 8), 128, dtype=torch.uint8)
    # hue and saturation leave a gray image alone; brightness scales it
    out = aug(gray, identity(1) | {"hue": torch.tensor([0.5]), "saturation": torch.tensor([0.0])})
    torch.testing.assert_close(out, gray.float() / 255, atol=1e-5, rtol=0)
    out = aug(gray, identity(1) | {"brightness": torch.tensor([1.2])})
    torch.testing.assert_close(out, gray.float() / 255 * 1.2, atol=1e-5, rtol=0)
    red = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    red[:, 0] = 200
    shifted = aug(red, identity(1) | {"hue": torch.tensor([0.1])})
    assert shifted[0, 1:].mean() > 0.01  # red turned toward another hue
    flat = aug(red, identity(1) | {"saturation": torch.tensor([0.0])})
    assert torch.allclose(flat[0, 0], flat[0, 1]) and torch.allclose(flat[0, 1], flat[0, 2])


@pytest.mark.parametrize("where,device,on_device", [("auto", "cpu", False), ("auto", "cuda", True),
                                                     ("device", "cpu", True), ("loader", "cuda", False)])
def test_augmentation_runs_where_speed_augment_on_says(tiny_cfg, where, device, on_device):
    tiny_cfg.speed.augment_on = where
    tiny_cfg.train.batch_size = 4
    labels = LabelSet.from_config(tiny_cfg.labels)
    pixels = np.random.default_rng(0).integers(0, 256, (6, 72, 72, 3), dtype=np.uint8)
    ds = TrainDataset(pixels, y=np.arange(6) % 7, captions=[[]] * 6, groups=np.arange(6), index=np.arange(6),
                      labels=labels, hflip=True)
    loader, device_augment = train_pipeline(ds, tiny_cfg, torch.device(device), (MEAN, STD, 64))
    batch = next(iter(loader))
    if on_device:
        assert isinstance(device_augment, BatchAugment) and batch["image"].dtype == torch.uint8
        assert batch["image"].shape == (4, 3, 72, 72)
    else:
        assert device_augment is None and batch["image"].dtype == torch.float32
        assert batch["image"].shape == (4, 3, 64, 64)


def test_captions_are_tokenised_once_each(tiny_cfg):
    tiny_cfg.model.pretrained = ""
    model = build_model(tiny_cfg, LabelSet.from_config(tiny_cfg.labels))
    calls = []
    tokenizer = model.tokenizer
    model.tokenizer = lambda texts: (calls.append(list(texts)), tokenizer(texts))[1]
    caps = ["left nasal polyp", "right ear drum", "left nasal polyp"]
    torch.testing.assert_close(model.tokenize(caps), tokenizer(caps), atol=0, rtol=0)
    torch.testing.assert_close(model.tokenize(caps[::-1] + ["new"]), tokenizer(caps[::-1] + ["new"]), atol=0, rtol=0)
    assert calls == [["left nasal polyp", "right ear drum"], ["new"]]


def _outputs(overrides: list[str], compile_: bool = False):
    from accelerate.state import AcceleratorState

    cfg = load_config("configs/demo.yaml", ["model.pretrained="] + overrides)
    torch.manual_seed(0)
    model = build_model(cfg, LabelSet.from_config(cfg.labels)).eval()
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        acc = make_accelerator(cfg, cpu=True)
        prepared = acc.prepare(model)
        assert compile_ == (type(prepared).__name__ == "OptimizedModule")
        x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            return prepared(x)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("overrides", [["speed.sdpa=math"], ["speed.sdpa=flash"], ["speed.channels_last=true"]])
def test_speed_options_keep_the_outputs(overrides):
    ref, out = _outputs([]), _outputs(overrides)
    for key in ("emb", "head_logits", "prompt_logits"):
        torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=1e-5)


def test_speed_options_reach_the_model():
    """The pins are really applied: no CPU kernel exists for `efficient`, and the patch conv is NHWC."""
    with pytest.raises(RuntimeError, match="No viable backend"):
        _outputs(["speed.sdpa=efficient"])
    cfg = load_config("configs/demo.yaml", ["model.pretrained=", "speed.channels_last=true"])
    conv = build_model(cfg, LabelSet.from_config(cfg.labels)).base.visual.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


@pytest.mark.slow
def test_compile_through_accelerate_keeps_the_outputs():
    """speed.compile=true: Accelerate wraps the model with torch.compile (inductor) at prepare()."""
    ref, out = _outputs([]), _outputs(["speed.compile=true"], compile_=True)
    for key in ("emb", "head_logits", "prompt_logits"):
        torch.testing.assert_close(out[key], ref[key], atol=1e-4, rtol=1e-4)
