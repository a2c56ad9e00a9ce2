"""Images and texts through a (fold's) model, in batches under Accelerate: class probabilities per
test-time view, unit image and caption embeddings, and the prompt-guided retrieval embedding.

Training (held-out monitoring and the OOF files) and inference embed through these same functions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from entrep.cli import progress, raise_if_interrupted
from entrep.data.dataset import EvalDataset, collate, eval_transform
from entrep.labels import LabelSet
from entrep.model.slerp import slerp

# head vs prompt probabilities where nothing was tuned yet (per-epoch monitoring, a run without tuned.json)
DEFAULT_HEAD_WEIGHT = 0.5


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
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    tf = eval_transform(stats.size, stats.mean, stats.std)
    loader = images if isinstance(images, DataLoader) else eval_loader(images, accelerator, batch_size)
    results = []
    views = [False, True] if tta_flip else [False]
    with progress("embedding", len(loader) * len(views), accelerator.is_main_process) as advance:
        for flip in views:
            results.append(_embed_view(model, loader, tf, accelerator, flip, advance))
    flip = [lambda p: p, labels.flip_probs]
    has_prompts = unwrapped.uses_prompts
    class_emb = unwrapped.class_embeddings().float().cpu().numpy() if has_prompts else None
    return Embedded([f(r["head"]) for f, r in zip(flip, results)],
                    [f(r["prompt"]) for f, r in zip(flip, results)] if has_prompts else None,
                    results[0]["emb"], class_emb)


def _embed_view(model, loader, tf, accelerator, flip: bool, advance) -> dict:
    """One view (as is, or flipped) of every image: softmaxed head and prompt logits and embeddings, in order."""
    idx, head, prompt, emb = [], [], [], []
    for batch in loader:
        raise_if_interrupted()
        x = tf(batch["image"].flip(-1) if flip else batch["image"])  # batched, on the device
        with accelerator.autocast():
            out = model(x)
        g = accelerator.gather_for_metrics({"index": batch["index"], "head": out["head_logits"].float(),
                                            "prompt": out.get("prompt_logits", out["head_logits"]).float(),
                                            "emb": out["emb"].float()})
        idx.append(g["index"].cpu()); head.append(g["head"].cpu())
        prompt.append(g["prompt"].cpu()); emb.append(g["emb"].cpu())
        advance()
    order = torch.cat(idx).argsort()
    return {"head": torch.cat(head)[order].softmax(-1).numpy(), "prompt": torch.cat(prompt)[order].softmax(-1).numpy(),
            "emb": torch.cat(emb)[order].numpy()}


@torch.inference_mode()
def embed_texts(model, texts: list[str], accelerator, batch_size: int = 256) -> np.ndarray:
    """(len(texts), D) unit caption embeddings (none for a member without a text tower)."""
    unwrapped = accelerator.unwrap_model(model)
    if not unwrapped.has_text:
        return np.zeros((0, unwrapped.embed_dim), dtype=np.float32)
    unwrapped.eval()
    out = []
    for s in range(0, len(texts), batch_size):
        tokens = unwrapped.tokenize(texts[s:s + batch_size]).to(accelerator.device)
        with accelerator.autocast():
            out.append(unwrapped.encode_text(tokens).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, unwrapped.embed_dim), dtype=np.float32)


def retrieval_embedding(emb: np.ndarray, probs: np.ndarray, class_emb: np.ndarray | None, alpha: float) -> np.ndarray:
    """slerp(image emb, normalised probability-weighted class prompt, alpha); emb when off."""
    if class_emb is None or alpha <= 0:
        return emb
    target = F.normalize(torch.from_numpy(probs @ class_emb), dim=-1)
    return slerp(torch.from_numpy(emb), target, alpha).numpy()
