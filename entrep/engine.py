"""Optimisation under Accelerate: the one Accelerator, the train step (joint loss, AdamW,
warmup/cosine) and one fold's epochs (`FoldTrainer.fit`)."""
from __future__ import annotations

import contextlib
import logging
import math
import re
import time

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import TorchDynamoPlugin
from torch.utils.data import DataLoader

from entrep.cli import EpochBars, raise_if_interrupted
from entrep.data.augment import BatchAugment
from entrep.data.dataset import ConcatRows, TrainCollate, TrainDataset
from entrep.embedding import DEFAULT_HEAD_WEIGHT, Embedded, embed_images
from entrep.errors import EntrepError
from entrep.labels import LabelSet
from entrep.losses import caption_targets, joint_loss
from entrep.metrics import classification_metrics
from entrep.model.slerp import slerp
from entrep.timing import StageTimer

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
    pull the temperature and the fusion weights toward zero for no regularising gain.
    `train.layer_decay` < 1 scales a backbone tensor's lr by decay^(depth from the top of its tower)."""
    depth = layer_depths(model) if cfg.train.layer_decay < 1 else {}
    groups: dict[tuple[bool, bool, float], list] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            backbone = n.startswith("clip.")
            scale = cfg.train.layer_decay ** depth[n] if backbone and n in depth else 1.0
            groups.setdefault((backbone, p.ndim >= 2, scale), []).append(p)
    return [{"params": ps, "lr": (cfg.train.lr_lora * scale) if backbone else cfg.train.lr_head,
             "weight_decay": cfg.train.weight_decay if decay else 0.0}
            for (backbone, decay, scale), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2]))]


TEXT_EMBEDDINGS = re.compile(r"(?:^|\.)(?:token_embedding|positional_embedding|embeddings|embed_tokens|embed_positions"
                             r"|shared)\b")  # what feeds a text tower's first block, in every text family


def layer_depths(model) -> dict[str, int]:
    """Backbone parameter name -> layers from the top of its tower, as timm's layer decay counts them.

    A tower on a timm trunk (open_clip's TimmModel, a timm: member) takes timm's own layer map (its
    group_matcher, as timm's param_groups_layer_decay does), the tower's projection head above it at 0.
    Elsewhere (open_clip's ViT and ResNet, every text tower): block i of N is N - i; a tensor of the
    tower's head (the family record's `head`: final norm, projection, pooling) is 0; anything else
    (patch or token embedding, stem, class token, pre-norm) is N + 1. Text towers have no head record:
    a text tensor outside the blocks is N + 1 when it is an embedding (TEXT_EMBEDDINGS), else 0.
    Hand-written there: a CLIP (or peft-wrapped) model has no group_matcher. Registration order, which
    this used before, put open_clip's visual.proj at N + 1 and ConvNeXt's stage downsamples at 0."""
    from entrep.model.families import blocks

    family = model.family
    trunk = getattr(model.base.visual, "trunk", None)
    timm_map = _timm_depths(trunk) if hasattr(trunk, "group_matcher") else None
    towers = [(family.vision.blocks, r"visual\.", family.vision.head)]
    if family.text is not None:
        towers.append((family.text.blocks, family.text.tower, None))
    out = {}
    for block_rx, tower_rx, head in towers:
        index = {b: i for i, (b, _) in enumerate(blocks(model.base, block_rx))}
        n_blocks = len(index)
        in_block, in_tower = re.compile(rf"(?:^|\.)({block_rx})\."), re.compile(rf"(?:{tower_rx})")
        for n, _ in model.named_parameters():
            inner = n[len("clip."):].replace("base_model.model.", "", 1) if n.startswith("clip.") else None
            if inner is None or n in out or not in_tower.match(inner):
                continue
            if head is not None and timm_map is not None:
                out[n] = timm_map.get(inner[len("visual.trunk."):], 0) if inner.startswith("visual.trunk.") else 0
            elif m := in_block.search(inner):
                out[n] = n_blocks - index[m.group(1)]
            elif head is None:
                out[n] = n_blocks + 1 if TEXT_EMBEDDINGS.search(inner) else 0
            else:
                out[n] = 0 if any(inner == h or inner.startswith(h + ".") for h in head) else n_blocks + 1
    return out


def _timm_depths(trunk) -> dict[str, int]:
    """A timm trunk's parameter name -> depth, as timm's param_groups_layer_decay derives it."""
    from timm.models import group_parameters

    layer_map = group_parameters(trunk, trunk.group_matcher(coarse=False), reverse=True)
    top = max(layer_map.values())
    return {n: top - i for n, i in layer_map.items()}


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
                      class_weights=class_weights, slerp_views=views, soft_targets=batch.get("soft_targets"),
                      mixed=batch.get("mixed"))


class WeightEMA:
    """An exponential moving average of the trainable tensors (adapters, fusion, head, scales).
    Hand-written: timm's ModelEmaV3 deep-copies the whole model, the frozen backbone included, where
    only the trainable tensors move. `warmup` (train.ema_warmup) sets each update's decay d_t:

    - "debiased": Adam's bias correction of an average started at zero, kept as the corrected
      average itself (d_t = 1 - (1 - d) / (1 - d^t)): the average weighs step s by d^(t-s) from the
      first step on, so 0.99 and 0.999 differ at any length, and no initial weight is held;
    - "timm": ModelEmaV3's warm-up, 0 at the first update, then min(d, 1 - t^(-2/3)); it reaches 0.99
      after 1,000 updates and 0.999 after 31,623, so in a 360-step run every decay above 0.98 acts alike;
    - "tf": TensorFlow's num_updates rule min(d, (1 + t) / (10 + t)), which this kit used before: 0.99
      after 891 updates, 0.999 after 8,991."""

    def __init__(self, model, decay: float, warmup: str = "debiased"):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def step_decay(self, t: int) -> float:
        """The decay of update t (1-based)."""
        d = self.decay
        if self.warmup == "debiased":
            return 1 - (1 - d) / (1 - d ** t)
        if self.warmup == "timm":
            return 0.0 if t <= 1 else min(d, 1 - t ** (-2 / 3))
        return min(d, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model) -> None:
        self.updates += 1
        d = self.step_decay(self.updates)
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self, model) -> dict[str, torch.Tensor]:
        """Put the averaged tensors into the model; returns the ones they replaced."""
        params, replaced = dict(model.named_parameters()), {}
        for n, t in self.shadow.items():
            replaced[n] = params[n].detach().clone()
            params[n].copy_(t)
        if hasattr(model, "invalidate_cache"):
            model.invalidate_cache()  # class prompt embeddings follow the text adapters
        return replaced

    @contextlib.contextmanager
    def applied(self, model):
        """The model with the averaged tensors, for an evaluation; the trained ones come back after."""
        replaced = self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                params = dict(model.named_parameters())
                for n, t in replaced.items():
                    params[n].copy_(t)
            if hasattr(model, "invalidate_cache"):
                model.invalidate_cache()


class NonFiniteLoss(EntrepError):
    pass


class BatchMix:
    """Mixup / cutmix of the labelled images of a batch (timm's Mixup, one draw per image), with soft
    targets for the cross-entropies. A horizontal flip has already swapped a flipped image's laterality
    label, so mixing a left and a right image gives the proportional soft target. Unlabelled images are
    not mixed; a mixed image leaves the contrastive losses (joint_loss says why)."""

    def __init__(self, cfg, n_classes: int):
        from timm.data import Mixup

        self.mix = Mixup(mixup_alpha=cfg.train.mixup_alpha, cutmix_alpha=cfg.train.cutmix_alpha,
                         prob=cfg.train.mix_prob, mode="elem", label_smoothing=cfg.loss.label_smoothing,
                         num_classes=n_classes)
        self.n_classes, self.smoothing = n_classes, cfg.loss.label_smoothing

    def __call__(self, batch: dict) -> dict:
        y = batch["y"]
        rows = (y >= 0).nonzero().squeeze(1)
        rows = rows[: len(rows) - len(rows) % 2]  # timm pairs image i with image n-1-i: an even count
        soft = torch.full((len(y), self.n_classes), self.smoothing / self.n_classes, device=y.device)
        soft[y >= 0] = soft[y >= 0].scatter(1, y[y >= 0, None], 1 - self.smoothing + self.smoothing / self.n_classes)
        mixed = torch.zeros(len(y), dtype=torch.bool, device=y.device)
        if len(rows) >= 2:
            x = batch["image"][rows].clone()
            before = x.clone()
            x, target = self.mix(x, y[rows])
            batch["image"] = batch["image"].index_put((rows,), x)
            soft[rows] = target.to(soft.dtype)
            mixed[rows] = (x != before).flatten(1).any(1)
        return {**batch, "soft_targets": soft, "mixed": mixed}


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
        self.ema = (WeightEMA(self.unwrapped, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema_decay > 0
                    else None)
        mixing = cfg.train.mixup_alpha > 0 or cfg.train.cutmix_alpha > 0
        self.mix = BatchMix(cfg, len(self.unwrapped.labels)) if mixing else None

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
        if self.mix is not None:
            batch = self.mix(batch)
        with accelerator.accumulate(model):
            loss, parts = train_loss(model, batch, self.cfg, accelerator, class_weights=self.class_weights,
                                     use_slerp=self.use_slerp)
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.cfg.train.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), self.cfg.train.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        if self.ema is not None and accelerator.sync_gradients:
            self.ema.update(self.unwrapped)
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
            groups: np.ndarray, image_stats, *, val_loader: DataLoader | None = None, tag: str = "",
            extra: tuple | None = None, timer: StageTimer | None = None) -> tuple[dict, list[dict]]:
        """Train on `train_rows` (plus `extra` = (pixels, labels) of pseudo-labelled images); returns (last
        epoch's figures, per-epoch log rows). `val_loader` (an `eval_loader` of `val_rows`) is embedded after
        each epoch to watch the run. With train.ema_decay the model ends holding the averaged weights.
        `timer` gets the train steps and the per-epoch monitoring as stages."""
        cfg, accelerator = self.cfg, self.accelerator
        timer = timer or StageTimer()
        y = table["y"].to_numpy()
        ds = self._dataset(pixels, table, train_rows, groups, extra)
        weights = class_weights_for(ds.y, len(self.labels), accelerator.device) if cfg.loss.class_weights else None
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
                with timer.stage("train_steps"):
                    for i, batch in enumerate(loader):
                        raise_if_interrupted()
                        loss, parts = step(batch)
                        if not self._finite(loss):
                            raise NonFiniteLoss(self._diverged(tag, loss, epoch, i, len(loader)))
                        seen += len(batch["y"]) * accelerator.num_processes
                        for key, v in {"loss": loss, **parts}.items():
                            sums[key] = sums.get(key, 0.0) + v
                        progress.step(seen / max(time.perf_counter() - t0, 1e-9), loss)
                progress.end_epoch()
                row = {"epoch": epoch + 1, **{k: v / max(1, len(loader)) for k, v in sums.items()},
                       "img_per_s": seen / max(time.perf_counter() - t0, 1e-9),
                       "lr_head": step.scheduler.get_last_lr()[0]}
                every, last = cfg.train.monitor_every, epoch + 1 == cfg.train.epochs
                if val_loader is not None and monitor != "none" and (last or (every and (epoch + 1) % every == 0)):
                    with timer.stage("monitoring"), (step.ema.applied(step.unwrapped) if step.ema is not None
                                                     else contextlib.nullcontext()):
                        emb = embed_images(model, val_loader, accelerator, self.labels, image_stats)
                    row["val_" + monitor] = self._monitor_score(emb, y[val_rows])
                history.append(row)
                # Accelerate's trackers (train.log_with; a no-op without them), one series per fold
                accelerator.log({f"{tag.replace(' ', '') or 'train'}/{k}": v for k, v in row.items() if k != "epoch"},
                                step=epoch + 1)
                self._log_epoch(tag, row, (time.perf_counter() - start) / (epoch + 1) * (cfg.train.epochs - epoch - 1))
        accelerator.wait_for_everyone()
        if step.ema is not None:  # the fold is evaluated and saved with the averaged weights
            step.ema.copy_to(step.unwrapped)
        last = {k: v for k, v in history[-1].items() if k.startswith("val_") or k == "loss"} if history else {}
        return {"trained_epochs": cfg.train.epochs, **{f"last_{k}": v for k, v in last.items()}}, history

    def _log_epoch(self, tag: str, row: dict, left: float) -> None:
        """One line per epoch: the only progress a log file, nohup or a notebook shows."""
        monitor = self.cfg.train.monitor_metric
        log.info("%sepoch %d/%d: loss %.4f, %.0f img/s%s, fold ends in %.0f s", f"{tag} " if tag else "",
                 row["epoch"], self.cfg.train.epochs, row.get("loss", float("nan")), row["img_per_s"],
                 f", held-out {monitor} {row['val_' + monitor]:.4f} (watched, not used)" if "val_" + monitor in row
                 else "", left)

    def _finite(self, loss: float) -> bool:
        """The loss is finite on every process (under DDP a rank that stopped alone would leave the others
        waiting in the next all-reduce)."""
        if self.accelerator.num_processes == 1:
            return math.isfinite(loss)
        flag = torch.tensor(float(math.isfinite(loss)), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "min").item())

    def _diverged(self, tag: str, loss: float, epoch: int, i: int, steps: int) -> str:
        t = self.cfg.train
        return (f"{tag or 'training'}: the loss is {loss} at epoch {epoch + 1}, step {i + 1} of {steps} "
                f"(train.lr_lora={t.lr_lora}, train.lr_head={t.lr_head}); the fold is left unfinished and nothing of "
                f"it is saved: lower the learning rates" + ("" if t.mixed_precision == "no" else
                                                            ", or train.mixed_precision=no (an fp16/bf16 overflow)"))

    def _dataset(self, pixels, table, train_rows: np.ndarray, groups: np.ndarray, extra) -> TrainDataset:
        """The training rows, and after them `extra`'s pseudo-labelled images (no caption, no group)."""
        y = table["y"].to_numpy()
        captions = [table["captions"].iloc[i] for i in train_rows]
        rows_y, rows_groups, index, rows_pixels = y[train_rows], groups[train_rows], train_rows, pixels[train_rows]
        if extra is not None and len(extra[1]):
            rows_pixels = ConcatRows(rows_pixels, extra[0])
            rows_y = np.concatenate([rows_y, extra[1]])
            rows_groups = np.concatenate([rows_groups, np.full(len(extra[1]), -1)])
            index = np.concatenate([index, np.full(len(extra[1]), -1)])
            captions += [[] for _ in extra[1]]
        return TrainDataset(rows_pixels, y=rows_y, captions=captions, groups=rows_groups, index=index,
                            labels=self.labels, hflip=self.cfg.train.hflip)

    def _monitor_score(self, emb: Embedded, y: np.ndarray) -> float:
        """The held-out classification score, logged per epoch to watch the run."""
        lab = y >= 0
        if not lab.any():
            return 0.0
        probs = emb.probs(DEFAULT_HEAD_WEIGHT, tta=False)
        return classification_metrics(y[lab], probs[lab].argmax(1), self.labels.names)[self.cfg.train.monitor_metric]
