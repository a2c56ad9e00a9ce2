"""One fold's training and evaluation under Accelerate, and batched embedding for inference."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from entrep.data.augment import BatchAugment
from entrep.data.dataset import EvalDataset, TrainCollate, TrainDataset, collate, eval_transform
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


def make_accelerator(cfg, **kwargs):
    """The one Accelerator of a command; `speed.compile` asks Accelerate to torch.compile at prepare()."""
    from accelerate import Accelerator
    from accelerate.utils import TorchDynamoPlugin

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


def combine_probs(head: np.ndarray, prompt: np.ndarray | None, head_weight: float) -> np.ndarray:
    return head if prompt is None else head_weight * head + (1 - head_weight) * prompt


@dataclass
class Embedded:
    """Per-image outputs in the order of the input rows. Probabilities are kept per view
    ([plain] or [plain, flipped-with-columns-swapped]); the embedding is the plain view only,
    since a flip changes what laterality the image shows."""
    head: list[np.ndarray]
    prompt: list[np.ndarray] | None
    emb: np.ndarray
    class_emb: np.ndarray | None

    def probs(self, head_weight: float, tta: bool) -> np.ndarray:
        n = len(self.head) if tta else 1
        head = sum(self.head[:n]) / n
        prompt = None if self.prompt is None else sum(self.prompt[:n]) / n
        return combine_probs(head, prompt, head_weight)


def eval_loader(pixels: np.ndarray, accelerator, batch_size: int) -> DataLoader:
    """The eval loader of one image set, prepared (sharded over processes) once: the Accelerator keeps
    every loader it prepares, so a fold prepares its held-out loader once and embeds with it each epoch."""
    return accelerator.prepare(DataLoader(EvalDataset(pixels, np.arange(len(pixels))), batch_size=batch_size,
                                          shuffle=False, collate_fn=collate))


@torch.inference_mode()
def embed_images(model, images, accelerator, labels: LabelSet, stats, *, batch_size: int = 128,
                 tta_flip: bool = False) -> Embedded:
    """Embed every image of `images` (uint8 pixels, or an `eval_loader`) in order; with tta_flip, add
    a flipped view whose probabilities have the left/right columns swapped before averaging.
    stats: the model's ImageStats (mean, std, input size)."""
    m = accelerator.unwrap_model(model)
    m.eval()
    tf = eval_transform(stats.size, stats.mean, stats.std)
    loader = images if isinstance(images, DataLoader) else eval_loader(images, accelerator, batch_size)
    results = []
    for flip in [False, True] if tta_flip else [False]:
        idx, head, prompt, emb = [], [], [], []
        for batch in loader:
            x = tf(batch["image"].flip(-1) if flip else batch["image"])  # batched, on the device
            with accelerator.autocast():
                out = model(x)
            g = accelerator.gather_for_metrics({"index": batch["index"], "head": out["head_logits"].float(),
                                                "prompt": out.get("prompt_logits", out["head_logits"]).float(),
                                                "emb": out["emb"].float()})
            idx.append(g["index"].cpu()); head.append(g["head"].cpu())
            prompt.append(g["prompt"].cpu()); emb.append(g["emb"].cpu())
        order = torch.cat(idx).argsort()
        results.append({"head": torch.cat(head)[order].softmax(-1).numpy(),
                        "prompt": torch.cat(prompt)[order].softmax(-1).numpy(),
                        "emb": torch.cat(emb)[order].numpy()})
    flip = [lambda p: p, labels.flip_probs]
    has_prompts = m.cfg.prompts
    class_emb = m.class_embeddings().float().cpu().numpy() if has_prompts else None
    return Embedded([f(r["head"]) for f, r in zip(flip, results)],
                    [f(r["prompt"]) for f, r in zip(flip, results)] if has_prompts else None,
                    results[0]["emb"], class_emb)


@torch.inference_mode()
def embed_texts(model, texts: list[str], accelerator, batch_size: int = 256) -> np.ndarray:
    m = accelerator.unwrap_model(model)
    m.eval()
    out = []
    for s in range(0, len(texts), batch_size):
        tokens = m.tokenize(texts[s:s + batch_size]).to(accelerator.device)
        with accelerator.autocast():
            out.append(m.encode_text(tokens).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, m.embed_dim), dtype=np.float32)


def retrieval_embedding(emb: np.ndarray, probs: np.ndarray, class_emb: np.ndarray | None, alpha: float) -> np.ndarray:
    """slerp(image emb, normalised probability-weighted class prompt, alpha); emb when off."""
    if class_emb is None or alpha <= 0:
        return emb
    target = F.normalize(torch.from_numpy(probs @ class_emb), dim=-1)
    return slerp(torch.from_numpy(emb), target, alpha).numpy()


def train_loss(model, m, batch: dict, cfg, acc, class_weights=None, use_slerp: bool = True):
    """The joint loss of one batch: one forward for images and the batch's unique captions, plus
    (optionally) a slerp view of each labelled image toward its own class prompt. Everything the
    loss reads comes out of `model`'s forward (DDP); `m` (unwrapped) only tokenizes."""
    captions, text_pos = caption_targets(batch["all_captions"])
    tokens = m.tokenize(captions).to(acc.device) if captions and cfg.loss.text else None
    with acc.autocast():
        out = model(batch["image"], tokens)
    views = None
    if use_slerp:
        y = batch["y"].clamp(min=0)
        t = torch.rand(len(y), device=acc.device) * cfg.model.slerp.t_max
        views = slerp(out["emb"].float(), out["class_emb"][y].float(), t)
    out = {k: (v.float() if torch.is_tensor(v) else v) for k, v in out.items()}  # losses in fp32
    return joint_loss(out, batch["y"], batch["group"], out.get("text_emb"), text_pos, out["scale"], cfg.loss,
                      class_weights=class_weights, slerp_views=views)


class TrainStep:
    """The trainer's optimizer step, and the one that preflight, the shipped-config tests and the
    benchmark run: augmentation on the device where configured, joint loss, backward, gradient
    clipping, AdamW and the warmup/cosine schedule, under Accelerate's accumulation."""

    def __init__(self, cfg, acc, model, loader, total_steps: int, device_augment=None, class_weights=None):
        optimizer = torch.optim.AdamW(param_groups(model, cfg))  # each group carries its own weight decay
        scheduler = cosine_schedule(optimizer, total_steps, cfg.train.warmup_frac)
        self.model, self.optimizer, self.loader, self.scheduler = acc.prepare(model, optimizer, loader, scheduler)
        self.m = acc.unwrap_model(self.model)
        self.cfg, self.acc, self.device_augment, self.class_weights = cfg, acc, device_augment, class_weights
        self.use_slerp = cfg.model.slerp.train and cfg.model.prompts and cfg.model.slerp.t_max > 0

    def __call__(self, batch: dict) -> tuple[float, dict]:
        """One batch; returns the loss and its parts as floats."""
        acc, model = self.acc, self.model
        if self.device_augment is not None:
            batch["image"] = self.device_augment(batch["image"])
        with acc.accumulate(model):
            loss, parts = train_loss(model, self.m, batch, self.cfg, acc, self.class_weights, self.use_slerp)
            acc.backward(loss)
            if acc.sync_gradients and self.cfg.train.max_grad_norm > 0:
                acc.clip_grad_norm_(model.parameters(), self.cfg.train.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        return float(loss.detach()), parts


def total_steps(loader: DataLoader, cfg) -> int:
    """Optimizer steps of a fold, from the unprepared (whole-dataset) loader."""
    return math.ceil(len(loader) / cfg.train.grad_accum) * cfg.train.epochs


class EpochBars:
    """rich progress bars (epochs, and steps of the current epoch) on the main process (`enabled`);
    elsewhere every call does nothing. console None: rich's default console."""

    def __init__(self, console, epochs: int, enabled: bool = True):
        self.bars = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=True)
            self.epochs = self.bars.add_task("epochs", total=epochs)

    def __enter__(self):
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc):
        if self.bars is not None:
            self.bars.stop()

    def start_epoch(self, epoch: int, steps: int) -> None:
        if self.bars is not None:
            self.epoch, self.task = epoch, self.bars.add_task(f"epoch {epoch + 1}", total=steps)

    def step(self, img_per_s: float, loss: float) -> None:
        if self.bars is not None:
            self.bars.update(self.task, advance=1, description=f"epoch {self.epoch + 1} {img_per_s:,.0f} img/s "
                                                                f"loss {loss:.3f}")

    def end_epoch(self) -> None:
        if self.bars is not None:
            self.bars.remove_task(self.task)
            self.bars.advance(self.epochs)


class FoldTrainer:
    """Fits one fold for exactly `train.epochs` epochs: joint loss, AdamW + warmup/cosine.

    No epoch is picked on the held-out fold, since that fold then scores the model: the cosine
    schedule ends at the last epoch and that epoch is kept. The held-out score per epoch is logged
    to watch the run (`train.monitor_metric`), never used for a choice.
    """

    def __init__(self, cfg, accelerator, labels: LabelSet, console=None):
        self.cfg, self.acc, self.labels, self.console = cfg, accelerator, labels, console

    def fit(self, model, pixels: np.ndarray, table, train_rows: np.ndarray, val_rows: np.ndarray,
            groups: np.ndarray, image_stats, *, val_loader: DataLoader | None = None,
            tag: str = "") -> tuple[dict, list[dict]]:
        """Train on `train_rows`; returns (last epoch's figures, per-epoch log rows). `val_loader`
        (an `eval_loader` of `val_rows`) is embedded after each epoch to watch the run."""
        cfg, acc = self.cfg, self.acc
        ds = TrainDataset(pixels[train_rows], table["y"].to_numpy()[train_rows],
                          [table["captions"].iloc[i] for i in train_rows], groups[train_rows], train_rows,
                          self.labels, cfg.train.hflip)
        loader, device_augment = train_pipeline(ds, cfg, acc.device, image_stats)
        class_weights = None
        if cfg.loss.class_weights:
            y = table["y"].to_numpy()[train_rows]
            counts = np.bincount(y[y >= 0], minlength=len(self.labels)).astype(np.float32)
            w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(self.labels), 0.0)
            class_weights = torch.tensor(w, dtype=torch.float32, device=acc.device)
        step = TrainStep(cfg, acc, model, loader, total_steps(loader, cfg), device_augment, class_weights)
        model, loader = step.model, step.loader
        if len(loader) == 0:  # an epoch of no step would "train" silently
            from entrep.errors import EntrepError

            raise EntrepError(f"{len(train_rows)} training images make no full batch of train.batch_size="
                              f"{cfg.train.batch_size} on each of {acc.num_processes} processes; lower train.batch_size")

        history, monitor = [], cfg.train.monitor_metric
        progress = EpochBars(self.console, cfg.train.epochs, enabled=acc.is_main_process)
        start = time.perf_counter()
        with progress:
            for epoch in range(cfg.train.epochs):
                model.train()
                progress.start_epoch(epoch, len(loader))
                t0, seen, sums = time.perf_counter(), 0, {}
                for batch in loader:
                    loss, parts = step(batch)
                    seen += len(batch["y"]) * acc.num_processes
                    for key, v in {"loss": loss, **parts}.items():
                        sums[key] = sums.get(key, 0.0) + v
                    progress.step(seen / max(time.perf_counter() - t0, 1e-9), loss)
                progress.end_epoch()
                row = {"epoch": epoch + 1, **{k: v / max(1, len(loader)) for k, v in sums.items()},
                       "img_per_s": seen / max(time.perf_counter() - t0, 1e-9),
                       "lr_head": step.scheduler.get_last_lr()[0]}
                if val_loader is not None and monitor != "none":
                    emb = embed_images(model, val_loader, acc, self.labels, image_stats)
                    row["val_" + monitor] = self._monitor_score(emb, table["y"].to_numpy()[val_rows])
                history.append(row)
                # Accelerate's trackers (train.log_with; a no-op without them), one series per fold
                acc.log({f"{tag.replace(' ', '') or 'train'}/{k}": v for k, v in row.items() if k != "epoch"},
                        step=epoch + 1)
                left = (time.perf_counter() - start) / (epoch + 1) * (cfg.train.epochs - epoch - 1)
                # one line per epoch: the only progress a log file, nohup or a notebook shows
                log.info("%sepoch %d/%d: loss %.4f, %.0f img/s%s, fold ends in %.0f s", f"{tag} " if tag else "",
                         epoch + 1, cfg.train.epochs, row.get("loss", float("nan")), row["img_per_s"],
                         f", held-out {monitor} {row['val_' + monitor]:.4f} (watched, not used)"
                         if "val_" + monitor in row else "", left)
        acc.wait_for_everyone()
        last = {k: v for k, v in history[-1].items() if k.startswith("val_") or k == "loss"} if history else {}
        return {"trained_epochs": cfg.train.epochs, **{f"last_{k}": v for k, v in last.items()}}, history

    def _monitor_score(self, emb: Embedded, y: np.ndarray) -> float:
        """The held-out classification score, logged per epoch to watch the run."""
        lab = y >= 0
        if not lab.any():
            return 0.0
        probs = emb.probs(0.5, tta=False)
        return classification_metrics(y[lab], probs[lab].argmax(1), self.labels.names)[self.cfg.train.monitor_metric]

