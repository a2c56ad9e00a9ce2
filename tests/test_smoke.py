"""Three steps of the full joint loss with every component on: the loss falls and nothing is NaN."""
import numpy as np
import torch

from entrep.data.augment import BatchAugment
from entrep.data.dataset import TrainCollate, TrainDataset
from entrep.data.folds import link_groups
from entrep.data.images import decode_all
from entrep.data.release import load_release
from entrep.labels import LabelSet
from entrep.losses import caption_targets, joint_loss
from entrep.model.backbone import image_stats
from entrep.model.entrep_clip import build_model
from entrep.model.slerp import slerp


def test_three_steps_of_the_joint_loss(demo, tiny_cfg):
    torch.manual_seed(0)
    cfg = tiny_cfg
    assert cfg.model.lora.enabled and cfg.model.fusion.enabled and cfg.model.prompts and cfg.model.slerp.train
    labels = LabelSet.from_config(cfg.labels)
    df, _ = load_release(demo, labels.names)
    df = df[df["captions"].map(bool) | (df["y"] >= 0)].head(24).reset_index(drop=True)
    model = build_model(cfg, labels).train()
    mean, std, size = image_stats(model.base)
    ds = TrainDataset(decode_all(df["path"].tolist(), 72), df["y"].to_numpy(), list(df["captions"]),
                      link_groups(df), np.arange(len(df)), labels, hflip=False)
    batch = TrainCollate(BatchAugment(size, mean, std))([ds[i] for i in range(len(ds))])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(3):
        captions, pos = caption_targets(batch["all_captions"])
        out = model(batch["image"], model.tokenize(captions))
        views = slerp(out["emb"], out["class_emb"][batch["y"].clamp(min=0)], torch.rand(len(df)) * 0.3)
        loss, parts = joint_loss(out, batch["y"], batch["group"], out["text_emb"], pos, model.scale(), cfg.loss,
                                 None, views)
        assert set(parts) == {"ce", "prompt", "text", "image"}
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[2] < losses[0], losses


def test_train_step_under_bf16_autocast(demo, tiny_cfg):
    """The real step under mixed precision (bf16 autocast runs on CPU too): fp32 losses, finite grads."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from entrep.engine import train_loss

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        acc = Accelerator(cpu=True, mixed_precision="bf16")
        labels = LabelSet.from_config(tiny_cfg.labels)
        df, _ = load_release(demo, labels.names)
        df = df[df["captions"].map(bool)].head(8).reset_index(drop=True)
        model = build_model(tiny_cfg, labels)
        mean, std, size = image_stats(model.base)
        ds = TrainDataset(decode_all(df["path"].tolist(), 72), df["y"].to_numpy(), list(df["captions"]),
                          link_groups(df), np.arange(len(df)), labels, True)
        model = acc.prepare(model)
        model.train()
        loss, parts = train_loss(model, acc.unwrap_model(model), TrainCollate(BatchAugment(size, mean, std))(
            [ds[i] for i in range(8)]), tiny_cfg, acc)
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and "text" in parts
        acc.backward(loss)
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
