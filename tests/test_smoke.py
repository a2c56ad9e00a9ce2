"""The train step with every loss term on: the loss falls and nothing is NaN, in fp32 and under bf16."""
from pathlib import Path

import numpy as np
import pytest
import torch

from entrep.data.augment import BatchAugment
from entrep.data.dataset import TrainCollate, TrainDataset
from entrep.data.folds import link_groups
from entrep.data.images import decode_all
from entrep.data.release import load_release
from entrep.labels import LabelSet
from entrep.model.backbone import image_stats
from entrep.model.entrep_clip import build_model


def test_three_train_steps_with_every_loss_term_lower_the_loss(demo):
    """The trainer's own step (engine.TrainStep: joint loss with slerp views, AdamW, schedule) on one
    fixed batch: every loss term is on, the loss falls and nothing is NaN."""
    from accelerate.state import AcceleratorState

    from entrep.config import load_config
    from entrep.engine import TrainStep, make_accelerator

    torch.manual_seed(0)
    cfg = load_config(Path(__file__).parents[1] / "configs/demo.yaml", ["train.warmup_frac=0"])  # full lr at once
    assert cfg.model.lora.enabled and cfg.model.fusion.enabled and cfg.model.prompts and cfg.model.slerp.train
    labels = LabelSet.from_config(cfg.labels)
    df, _ = load_release(demo, labels.names)
    df = df[df["captions"].map(bool) | (df["y"] >= 0)].head(24).reset_index(drop=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = make_accelerator(cfg, cpu=True)
    model = build_model(cfg, labels)
    stats = image_stats(model.base)
    ds = TrainDataset(decode_all(df["path"].tolist(), 72), y=df["y"].to_numpy(), captions=list(df["captions"]),
                      groups=link_groups(df), index=np.arange(len(df)), labels=labels, hflip=False)
    step = TrainStep.for_dataset(cfg, acc, model, ds, stats, steps=100)
    batch = next(iter(step.loader))
    assert len(batch["y"]) == 24 and step.use_slerp
    losses = []
    for _ in range(3):
        loss, parts = step(dict(batch))
        assert set(parts) == {"ce", "prompt", "text", "image"} and np.isfinite(loss)
        losses.append(loss)
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
        ds = TrainDataset(decode_all(df["path"].tolist(), 72), y=df["y"].to_numpy(), captions=list(df["captions"]),
                          groups=link_groups(df), index=np.arange(len(df)), labels=labels, hflip=True)
        model = acc.prepare(model)
        model.train()
        loss, parts = train_loss(model, TrainCollate(BatchAugment(size, mean, std))([ds[i] for i in range(8)]),
                                 tiny_cfg, acc)
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and "text" in parts
        acc.backward(loss)
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_a_fold_prepares_its_held_out_loader_once(demo):
    """Epoch monitoring and the final flip-TTA embedding reuse one prepared eval loader (the
    Accelerator keeps every loader it prepares): a fold holds 2, whatever its epoch count."""
    from accelerate.state import AcceleratorState

    from entrep.config import load_config
    from entrep.embedding import embed_images, eval_loader
    from entrep.engine import FoldTrainer, make_accelerator

    cfg = load_config(Path(__file__).parents[1] / "configs/demo.yaml", ["train.epochs=3", "train.batch_size=16"])
    labels = LabelSet.from_config(cfg.labels)
    df, _ = load_release(demo, labels.names)
    df = df.head(48).reset_index(drop=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = make_accelerator(cfg, cpu=True)
    model = build_model(cfg, labels)
    stats = image_stats(model.base)
    pixels = decode_all(df["path"].tolist(), cfg.data.working_side(stats.size))
    train_rows, val_rows = np.arange(32), np.arange(32, 48)
    val = eval_loader(pixels[val_rows], acc, 8)
    _, history = FoldTrainer(cfg, acc, labels).fit(model, pixels, df, train_rows, val_rows, link_groups(df), stats,
                                                   val_loader=val)
    e = embed_images(model, val, acc, labels, stats, tta_flip=True)
    assert len(history) == 3 and all("val_f1_macro" in row for row in history)
    assert e.emb.shape[0] == 16 and len(e.head) == 2
    assert len(acc._dataloaders) == 2  # the train loader and the one eval loader


def test_a_swallowed_signal_stops_the_next_train_step_and_embedding_batch(demo, monkeypatch):
    """What run_main's handler recorded but a __del__ swallowed is raised by the loops that take long."""
    import signal

    from accelerate.state import AcceleratorState

    from entrep import cli
    from entrep.config import load_config
    from entrep.embedding import embed_images, eval_loader
    from entrep.engine import FoldTrainer, make_accelerator

    cfg = load_config(Path(__file__).parents[1] / "configs/demo.yaml", ["train.epochs=1", "train.batch_size=8"])
    labels = LabelSet.from_config(cfg.labels)
    df, _ = load_release(demo, labels.names)
    df = df.head(16).reset_index(drop=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        acc = make_accelerator(cfg, cpu=True)
        model = build_model(cfg, labels)
        stats = image_stats(model.base)
        pixels = decode_all(df["path"].tolist(), cfg.data.working_side(stats.size))
        monkeypatch.setattr(cli, "_received", [signal.SIGINT])
        with pytest.raises(KeyboardInterrupt):
            FoldTrainer(cfg, acc, labels).fit(model, pixels, df, np.arange(16), np.arange(0), link_groups(df), stats)
        with pytest.raises(KeyboardInterrupt):
            embed_images(model, eval_loader(pixels, acc, 8), acc, labels, stats)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
