"""Optimisation under Accelerate: the one Accelerator, the train step (joint loss, AdamW,
warmup/cosine) and one fold's epochs (`FoldTrainer.fit`)."""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import TorchDynamoPlugin
from torch.utils.data import DataLoader

from entrep.cli import EpochBars
from entrep.data.augment import BatchAugment
from entrep.data.dataset import TrainCollate, TrainDataset
from entrep.embedding import DEFAULT_HEAD_WEIGHT, Embedded, embed_images
from entrep.errors import EntrepError
from entrep.labels import LabelSet
from entrep.losses import caption_targets, joint_loss
from entrep.metrics import classification_metrics
from entrep.model.slerp import slerp

log = logging.getLogger("entrep.train")


def resolve_mixed_precision(choice: str) -> str:
    """bf16 only where the GPU really has it (compute capability >= 8.0), fp16 on older GPUs, fp32 on CPU."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"
    return "no"


def make_accelerator(cfg, **kwargs) -> Accelerator:
    """The one Accelerator of a command; `speed.compile` asks Accelerate to torch.compile at prepare()."""
    if cfg.speed.compile:  # off: whatever `accelerate config` says (its default is no compile)
        kwargs["dynamo_plugin"] = TorchDynamoPlugin(backend="inductor", mode=cfg.speed.compile_mode)
    return Accelerator(mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision), **kwargs)


def train_pipeline(ds, cfg, device: torch.device, image_stats) -> tuple[DataLoader, BatchAugment | None]:
    """The training DataLoader, and the augmentation the step must still apply on the device (None
    when the loader applies it: `speed.augment_on`, auto = on the device when it is a GPU)."""
    mean, std, size = image_stats
    augment = BatchAugment(size, mean, std)
    where = cfg.speed.augment_on
    on_device = where == "device" or (where == "auto" and device.type == "cuda")
    bs = cfg.train.batch_size
    loader = DataLoader(ds, batch_size=bs, shuffle=True, drop_last=len(ds) > bs,
                        collate_fn=TrainCollate(None if on_device else augment), num_workers=cfg.data.num_workers,
                        persistent_workers=cfg.data.num_workers > 0)
    return loader, (augment if on_device else None)


def cosine_schedule(optimizer, total_steps: int, warmup_frac: float):
    warmup = int(total_steps * warmup_frac)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(model, cfg) -> list[dict]:
    """Adapters (and unfrozen base blocks) at lr_lora; the kit's fusion, head and logit_scale at
    lr_head. Weight decay only on matrices: as in open_clip's training, tensors of fewer than 2
    dimensions (biases, norms, logit_scale, the fusion level logits) are exempt, since decay would
    pull the temperature and the fusion weights toward zero for no regularising gain."""
    groups: dict[tuple[bool, bool], list] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((n.startswith("clip."), p.ndim >= 2), []).append(p)
    return [{"params": ps, "lr": cfg.train.lr_lora if backbone else cfg.train.lr_head,
             "weight_decay": cfg.train.weight_decay if decay else 0.0}
            for (backbone, decay), ps in sorted(groups.items())]


def class_weights_for(y: np.ndarray, n_classes: int, device) -> torch.Tensor:
    """Inverse-frequency class weights of the labelled rows (loss.class_weights); 0 for an absent class."""
    counts = np.bincount(y[y >= 0], minlength=n_classes).astype(np.float32)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0)
    return torch.tensor(w, dtype=torch.float32, device=device)


def train_loss(model, batch: dict, cfg, accelerator, *, class_weights=None, use_slerp: bool = True):
    """The joint loss of one batch: one forward for images and the batch's unique captions, plus
    (optionally) a slerp view of each labelled image toward its own class prompt. Everything the
    loss reads comes out of `model`'s forward (DDP); the unwrapped module only tokenizes."""
    unwrapped = accelerator.unwrap_model(model)
    captions, text_pos = caption_targets(batch["all_captions"])
    tokens = (unwrapped.tokenize(captions).to(accelerator.device) if captions and cfg.loss.text and unwrapped.has_text
              else None)
    with accelerator.autocast():
        out = model(batch["image"], tokens)
    views = None
    if use_slerp and unwrapped.uses_prompts:  # the view moves toward a class prompt: none without text
        y = batch["y"].clamp(min=0)
        t = torch.rand(len(y), device=accelerator.device) * cfg.model.slerp.t_max
        views = slerp(out["emb"].float(), out["class_emb"][y].float(), t)
    out = {k: (v.float() if torch.is_tensor(v) else v) for k, v in out.items()}  # losses in fp32
    return joint_loss(out, batch["y"], batch["group"], out.get("text_emb"), text_pos, out["scale"], cfg.loss,
                      class_weights=class_weights, slerp_views=views)


def total_steps(loader: DataLoader, cfg) -> int:
    """Optimizer steps of a fold, from the unprepared (whole-dataset) loader."""
    return math.ceil(len(loader) / cfg.train.grad_accum) * cfg.train.epochs


class TrainStep:
    """The trainer's optimizer step, and the one that preflight, the shipped-config tests and the
    benchmark run: augmentation on the device where configured, joint loss, backward, gradient
    clipping, AdamW and the warmup/cosine schedule, under Accelerate's accumulation."""

    def __init__(self, cfg, accelerator, model, loader, total_steps: int, device_augment=None, class_weights=None):
        optimizer = torch.optim.AdamW(param_groups(model, cfg))  # each group carries its own weight decay
        scheduler = cosine_schedule(optimizer, total_steps, cfg.train.warmup_frac)
        self.model, self.optimizer, self.loader, self.scheduler = accelerator.prepare(model, optimizer, loader,
                                                                                      scheduler)
        self.unwrapped = accelerator.unwrap_model(self.model)
        self.cfg, self.accelerator, self.device_augment = cfg, accelerator, device_augment
        self.class_weights = class_weights
        self.use_slerp = cfg.model.slerp.train and self.unwrapped.uses_prompts and cfg.model.slerp.t_max > 0

    @classmethod
    def for_dataset(cls, cfg, accelerator, model, dataset, image_stats, *, steps: int | None = None,
                    class_weights=None) -> "TrainStep":
        """The loader over `dataset` (augmentation where `speed.augment_on` puts it) and the step,
        prepared; `steps` for the schedule, default a fold's (`train.epochs` over the loader)."""
        loader, device_augment = train_pipeline(dataset, cfg, accelerator.device, image_stats)
        return cls(cfg, accelerator, model, loader, steps or total_steps(loader, cfg), device_augment, class_weights)

    def __call__(self, batch: dict) -> tuple[float, dict]:
        """One batch; returns the loss and its parts as floats."""
        accelerator, model = self.accelerator, self.model
        if self.device_augment is not None:
            batch["image"] = self.device_augment(batch["image"])
        with accelerator.accumulate(model):
            loss, parts = train_loss(model, batch, self.cfg, accelerator, class_weights=self.class_weights,
                                     use_slerp=self.use_slerp)
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.cfg.train.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), self.cfg.train.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        return float(loss.detach()), parts


class FoldTrainer:
    """Fits one fold for exactly `train.epochs` epochs: joint loss, AdamW + warmup/cosine.

    No epoch is picked on the held-out fold, since that fold then scores the model: the cosine
    schedule ends at the last epoch and that epoch is kept. The held-out score per epoch is logged
    to watch the run (`train.monitor_metric`), never used for a choice.
    """

    def __init__(self, cfg, accelerator, labels: LabelSet, console=None):
        self.cfg, self.accelerator, self.labels, self.console = cfg, accelerator, labels, console

    def fit(self, model, pixels: np.ndarray, table, train_rows: np.ndarray, val_rows: np.ndarray,
            groups: np.ndarray, image_stats, *, val_loader: DataLoader | None = None,
            tag: str = "") -> tuple[dict, list[dict]]:
        """Train on `train_rows`; returns (last epoch's figures, per-epoch log rows). `val_loader`
        (an `eval_loader` of `val_rows`) is embedded after each epoch to watch the run."""
        cfg, accelerator = self.cfg, self.accelerator
        y = table["y"].to_numpy()
        ds = TrainDataset(pixels[train_rows], y=y[train_rows], captions=[table["captions"].iloc[i] for i in train_rows],
                          groups=groups[train_rows], index=train_rows, labels=self.labels, hflip=cfg.train.hflip)
        weights = class_weights_for(y[train_rows], len(self.labels), accelerator.device) if cfg.loss.class_weights \
            else None
        step = TrainStep.for_dataset(cfg, accelerator, model, ds, image_stats, class_weights=weights)
        model, loader = step.model, step.loader
        if len(loader) == 0:  # an epoch of no step would "train" silently
            raise EntrepError(f"{len(train_rows)} training images make no full batch of train.batch_size="
                              f"{cfg.train.batch_size} on each of {accelerator.num_processes} processes; lower "
                              f"train.batch_size")

        history, monitor = [], cfg.train.monitor_metric
        progress = EpochBars(self.console, cfg.train.epochs, enabled=accelerator.is_main_process)
        start = time.perf_counter()
        with progress:
            for epoch in range(cfg.train.epochs):
                model.train()
                progress.start_epoch(epoch, len(loader))
                t0, seen, sums = time.perf_counter(), 0, {}
                for batch in loader:
                    loss, parts = step(batch)
                    seen += len(batch["y"]) * accelerator.num_processes
                    for key, v in {"loss": loss, **parts}.items():
                        sums[key] = sums.get(key, 0.0) + v
                    progress.step(seen / max(time.perf_counter() - t0, 1e-9), loss)
                progress.end_epoch()
                row = {"epoch": epoch + 1, **{k: v / max(1, len(loader)) for k, v in sums.items()},
                       "img_per_s": seen / max(time.perf_counter() - t0, 1e-9),
                       "lr_head": step.scheduler.get_last_lr()[0]}
                if val_loader is not None and monitor != "none":
                    emb = embed_images(model, val_loader, accelerator, self.labels, image_stats)
                    row["val_" + monitor] = self._monitor_score(emb, y[val_rows])
                history.append(row)
                # Accelerate's trackers (train.log_with; a no-op without them), one series per fold
                accelerator.log({f"{tag.replace(' ', '') or 'train'}/{k}": v for k, v in row.items() if k != "epoch"},
                                step=epoch + 1)
                left = (time.perf_counter() - start) / (epoch + 1) * (cfg.train.epochs - epoch - 1)
                # one line per epoch: the only progress a log file, nohup or a notebook shows
                log.info("%sepoch %d/%d: loss %.4f, %.0f img/s%s, fold ends in %.0f s", f"{tag} " if tag else "",
                         epoch + 1, cfg.train.epochs, row.get("loss", float("nan")), row["img_per_s"],
                         f", held-out {monitor} {row['val_' + monitor]:.4f} (watched, not used)"
                         if "val_" + monitor in row else "", left)
        accelerator.wait_for_everyone()
        last = {k: v for k, v in history[-1].items() if k.startswith("val_") or k == "loss"} if history else {}
        return {"trained_epochs": cfg.train.epochs, **{f"last_{k}": v for k, v in last.items()}}, history

    def _monitor_score(self, emb: Embedded, y: np.ndarray) -> float:
        """The held-out classification score, logged per epoch to watch the run."""
        lab = y >= 0
        if not lab.any():
            return 0.0
        probs = emb.probs(DEFAULT_HEAD_WEIGHT, tta=False)
        return classification_metrics(y[lab], probs[lab].argmax(1), self.labels.names)[self.cfg.train.monitor_metric]
