"""WiSE-FT (Wortsman et al., CVPR 2022): weight-space interpolation between the zero-shot base and a fold's
fine-tuned backbone, `infer.wise_grid`, tuned on OOF per part (classification, i2i, t2i) like the slerp alpha.

At scale s the backbone is  base + s * (fine-tuned - base):
- LoRA: the low-rank delta is scaled (peft's adapter scaling, module and parameter targets alike:
  `peft.helpers.rescale_adapter_scale`, which restores the exact scalings on exit);
- full fine-tuning (model.lora.enabled=false with unfrozen blocks): the trained backbone tensors are
  interpolated with the tensors the model was built with (pretrained weights, or the seeded random init),
  `torch.lerp(base, trained, s)`, and restored exactly on exit.
The kit's own modules (fusion, head, logit scale) stay as trained. Scale 1.0 touches nothing.

The OOF files hold the held-out outputs at every scale of the grid (scale 1.0 always, in the file's original
keys), and the known-pair memory (entrep/memory.py) when infer.memory_weight is on. `embed_fold_outputs`
writes them at the end of a fold's training; `load_run_oof` completes the files of finished folds from their
saved weights when a re-scoring asks for a scale or a memory they lack, so both keys are scoring keys.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from entrep.embedding import Embedded, embed_images, embed_texts, eval_loader
from entrep.errors import EntrepError
from entrep.memory import MEMORY_FILE, Memory, save_memory, table_pairs
from entrep.oof import OOF_FILE, FoldOOF, load_fold_oof, save_fold_oof

log = logging.getLogger("entrep.wise")


def wise_scales(cfg) -> list[float]:
    """The scales a fold's OOF outputs are embedded at: infer.wise_grid, and 1.0 (the model as trained)."""
    return sorted({1.0, *(float(s) for s in cfg.infer.wise_grid)})


def memory_on(cfg) -> bool:
    return any(w > 0 for w in cfg.infer.memory_weight)


def has_lora(model) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.clip.modules())


def start_state(model) -> dict[str, torch.Tensor]:
    """Copies of the backbone tensors that full fine-tuning trains (not LoRA, not the kit's modules), as the
    model holds them now: taken from a model as built, they are the zero-shot end of the interpolation."""
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and n.startswith("clip.") and "lora_" not in n}


def zero_shot_state(cfg, labels, model) -> dict[str, torch.Tensor] | None:
    """For a fully fine-tuned model: its trainable backbone tensors as built before training (the base is
    rebuilt: loaded weights, or the seeded random init), on the model's device; None for LoRA or a frozen
    backbone."""
    from entrep.model.entrep_clip import build_model

    trained = start_state(model)
    if not trained or has_lora(model):
        return None
    fresh = start_state(build_model(cfg, labels))
    missing = sorted(set(trained) - set(fresh))
    if missing:
        raise EntrepError(f"WiSE-FT: the rebuilt base lacks the trained tensors {missing[:3]}")
    return {n: fresh[n].to(trained[n].device, trained[n].dtype) for n in trained}


@contextlib.contextmanager
def wise_scaled(model, scale: float, start: dict[str, torch.Tensor] | None = None):
    """The EntrepCLIP `model` with its fine-tuning scaled by `scale` (LoRA delta, or trained backbone
    tensors interpolated with `start`); restored exactly on exit. Scale 1.0 changes nothing."""
    scale = float(scale)
    if scale == 1.0:
        yield model
        return
    with contextlib.ExitStack() as stack:
        if has_lora(model):
            from peft.helpers import rescale_adapter_scale

            stack.enter_context(rescale_adapter_scale(model.clip, scale))
        if start:
            params = dict(model.named_parameters())
            trained = {n: params[n].detach().clone() for n in start}

            def restore():
                with torch.no_grad():
                    for n, t in trained.items():
                        params[n].copy_(t)

            with torch.no_grad():
                for n, t in trained.items():
                    params[n].copy_(torch.lerp(start[n], t, scale))
            stack.callback(restore)
        model.invalidate_cache()  # class prompt embeddings come from the (scaled) text tower
        stack.callback(model.invalidate_cache)
        yield model


def embed_at(model, accelerator, labels, stats, loader, captions: list[str], scale: float, start,
             tta_flip: bool = True, merge_lora: bool = False) -> tuple[Embedded, np.ndarray]:
    """(image outputs, caption embeddings) of a loaded fold model at one WiSE scale: what OOF re-scoring,
    infer.py and pseudo-labels all embed with. `merge_lora` (infer.merge_lora) folds the adapters into
    the base weights for the pass."""
    from entrep.model.lora import merged

    unwrapped = accelerator.unwrap_model(model)
    with wise_scaled(unwrapped, scale, start), merged(unwrapped.clip) if merge_lora else contextlib.nullcontext():
        e = embed_images(model, loader, accelerator, labels, stats, tta_flip=tta_flip)
        cap = embed_texts(model, captions, accelerator)
    return e, cap


def _cat(a: Embedded, b: Embedded) -> Embedded:
    return Embedded([np.concatenate([x, y]) for x, y in zip(a.head, b.head)],
                    None if a.prompt is None else [np.concatenate([x, y]) for x, y in zip(a.prompt, b.prompt)],
                    np.concatenate([a.emb, b.emb]), a.class_emb)


def embed_fold_outputs(cfg, model, accelerator, labels, table, pixels, fold_of: np.ndarray, k: int, val_loader,
                       stats, out_dir: Path | None, scales: list[float] | None = None, memory: bool | None = None,
                       start=None) -> tuple[FoldOOF | None, Memory | None]:
    """Fold k's held-out images and captions with flip TTA at every WiSE scale (infer.wise_grid and 1.0), and,
    when infer.memory_weight is on, every image of the release (the known-pair memory, written to
    out_dir/memory.npz on the main process, for the all-data model k = -1 too; a stale one is removed; with
    out_dir None the caller writes it). Returns the FoldOOF (None for the all-data model; its memory
    attached) and the memory (None when off)."""
    unwrapped = accelerator.unwrap_model(model)
    scales = wise_scales(cfg) if scales is None else scales
    memory = memory_on(cfg) if memory is None else memory
    if start is None and any(s != 1.0 for s in scales):
        start = zero_shot_state(cfg, labels, unwrapped)
    val_rows = np.flatnonzero(fold_of == k) if k >= 0 else np.array([], dtype=int)
    train_rows = np.flatnonzero(fold_of != k) if k >= 0 else np.arange(len(table))
    captions = sorted({c for caps in table["captions"].iloc[val_rows] for c in caps}) if unwrapped.has_text else []
    held = {s: embed_at(model, accelerator, labels, stats, val_loader, captions, s, start) for s in scales} \
        if len(val_rows) else {}
    mem = None
    if memory:
        loader = eval_loader(pixels[train_rows], accelerator, cfg.train.eval_batch_size)
        embedded = {}
        for s in scales:
            e, _ = embed_at(model, accelerator, labels, stats, loader, [], s, start)
            embedded[s] = _cat(e, held[s][0]) if len(val_rows) else e
        images = table["image"].iloc[np.concatenate([train_rows, val_rows])].tolist()
        pair_image, pair_caption = table_pairs(images, table)
        mem = Memory(images, np.arange(len(images)) >= len(train_rows), embedded, pair_image, pair_caption)
    if accelerator.is_main_process and out_dir is not None:
        if mem is not None:
            save_memory(out_dir / MEMORY_FILE, mem)
        else:
            (out_dir / MEMORY_FILE).unlink(missing_ok=True)  # a memory of an earlier training of this fold
    if not len(val_rows):
        return None, mem
    e, cap = held[1.0]
    return FoldOOF(images=table["image"].iloc[val_rows].tolist(), embedded=e, captions=captions, caption_emb=cap,
                   text=unwrapped.has_text, scaled={s: v for s, v in held.items() if s != 1.0}, memory=mem), mem


def load_run_oof(cfg, data, dirs: dict[int, Path]) -> dict[int, FoldOOF]:
    """The finished folds' OOF files, completed from each fold's saved weights where infer.wise_grid asks for
    a scale, or infer.memory_weight for a memory, that the files lack (the re-scoring of a finished run:
    train.py --name RUN train.resume=true infer.wise_grid=[...] infer.memory_weight=[...])."""
    scales, want_memory = wise_scales(cfg), memory_on(cfg)
    out = {}
    for k, d in sorted(dirs.items()):
        oof = load_fold_oof(d / OOF_FILE)
        lack = [s for s in scales if s not in oof.scales]
        lack_memory = want_memory and (oof.memory is None or not set(scales) <= oof.memory.scales)
        if lack or lack_memory:
            oof = complete_fold(cfg, data, k, d, oof, lack, lack_memory)
        out[k] = oof
    return out


def complete_fold(cfg, data, k: int, d: Path, oof: FoldOOF, lack: list[float], lack_memory: bool) -> FoldOOF:
    """Embed fold k's missing WiSE scales (and memory) from its saved weights and rewrite its files."""
    from entrep.engine import make_accelerator
    from entrep.model.backbone import image_stats
    from entrep.model.checkpoint import load_fold_weights
    from entrep.model.entrep_clip import build_model

    accelerator = make_accelerator(cfg)
    if accelerator.num_processes > 1:
        raise EntrepError(f"{d}: its OOF file lacks WiSE scales {lack} or the known-pair memory, which are embedded "
                          f"from the saved weights; re-score in one process: python train.py --name "
                          f"{cfg.name} output_dir={cfg.output_dir} train.resume=true (with the same infer.* keys)")
    log.info("%s: embedding %s%s from the saved weights", d.name, f"WiSE scales {lack}" if lack else "",
             " and the known-pair memory" if lack_memory else "")
    model = accelerator.prepare(build_model(cfg, data.labels))
    unwrapped = accelerator.unwrap_model(model)
    start = start_state(unwrapped) if not has_lora(unwrapped) else None  # as built: the zero-shot end
    load_fold_weights(unwrapped, d, adapter_name=d.name)
    stats = image_stats(unwrapped.base)
    fold_of = data.fold_of
    val = eval_loader(data.pixels[np.flatnonzero(fold_of == k)], accelerator, cfg.train.eval_batch_size)
    memory_scales = sorted(set(wise_scales(cfg)) | (oof.memory.scales if oof.memory and not lack_memory else set()))
    if lack_memory:
        # the memory needs the held-out outputs at every scale too: re-embed them all (the model is loaded)
        new, _ = embed_fold_outputs(cfg, model, accelerator, data.labels, data.table, data.pixels, fold_of, k, val, stats,
                                 d, scales=sorted(set(memory_scales) | oof.scales), memory=True, start=start)
        if not np.array_equal(new.embedded.emb, oof.embedded.emb):
            log.info("%s: the reloaded fold embeds its held-out images %.2g off the OOF file (max abs); the file's "
                     "scale-1.0 outputs are kept", d.name, float(np.abs(new.embedded.emb - oof.embedded.emb).max()))
        merged = replace(oof, scaled={**new.scaled, **oof.scaled}, memory=new.memory)
    else:
        scaled = dict(oof.scaled)
        for s in lack:
            scaled[s] = embed_at(model, accelerator, data.labels, stats, val, oof.captions, s, start)
        merged = replace(oof, scaled=scaled)
    save_fold_oof(d / OOF_FILE, merged)
    del model, unwrapped
    accelerator.free_memory()
    return load_fold_oof(d / OOF_FILE) if lack_memory else merged

