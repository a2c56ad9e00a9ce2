"""Known-pair memory for text-to-image retrieval (`infer.memory_weight`).

The challenge's t2i captions are templated and repeat: the 71 public-test captions are exactly the keys of
train/t2i.json, most carried by several training images. A caption seen in training can be answered with
the help of the images that carry it: its query becomes

    q = normalise((1 - w) * text_emb(caption) + w * normalise(mean of the carriers' t2i retrieval embeddings))

with the carriers embedded by the same fold model, at the same WiSE scale, head weight and slerp alpha as
the gallery. A caption no memory image carries keeps its text embedding; w = 0 leaves every query as it was.

A fold's memory file (`memory.npz`, beside oof.npz) holds the fold model's embedding of every image of the
training release and its (caption, image) pairs, with a flag for the fold's held-out images:
- out of fold, fold k's memory is the other folds' images and pairs only (its model never saw fold k, and
  fold k's own carriers, which are the answers being scored, are not in it), so the OOF figure measures
  what the memory adds on captions the model meets again on new images;
- at inference, a fold model's memory is the whole training release (nothing is held out from a test set).

The i2i half (a query that is a near-duplicate of a training image answered with its training partner)
is not offered: folds keep near-duplicates and i2i components together, so out of fold it can never fire
and no OOF figure could measure it, and on a test set it fires only on train/test overlap, where it is a
lookup of the training annotation (`data check --test` lists those images) rather than a retrieval.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from entrep.embedding import Embedded, retrieval_embedding
from entrep.io import atomic_path
from entrep.rundir import MEMORY_FILE  # noqa: F401  (memory's file, named where every run file is)


def scale_key(name: str, scale: float) -> str:
    """The npz key of an array at a WiSE scale other than 1.0 (1.0 keeps the plain name)."""
    return name if scale == 1.0 else f"{name}@{float(scale)!r}"


def embedded_arrays(e: Embedded, scale: float) -> dict[str, np.ndarray]:
    arrays = {scale_key("emb", scale): e.emb, scale_key("head", scale): np.stack(e.head)}
    if e.prompt is not None:
        arrays |= {scale_key("prompt", scale): np.stack(e.prompt), scale_key("class_emb", scale): e.class_emb}
    return arrays


def embedded_from(z, scale: float) -> Embedded:
    p = scale_key("prompt", scale)
    return Embedded(list(z[scale_key("head", scale)]), list(z[p]) if p in z else None, z[scale_key("emb", scale)],
                    z[scale_key("class_emb", scale)] if scale_key("class_emb", scale) in z else None)


@dataclass(frozen=True)
class Memory:
    """One fold model's embedding of the training images (per WiSE scale) and their caption pairs."""
    images: list[str]
    held_out: np.ndarray              # (N,) bool: the fold's own held-out images (none for an all-data model)
    embedded: dict[float, Embedded]   # WiSE scale -> the images' outputs, flip TTA as for the OOF files
    pair_image: np.ndarray            # (P,) int rows of `images`
    pair_caption: list[str]           # (P,) the caption of each pair

    @property
    def scales(self) -> set[float]:
        return set(self.embedded)

    def carriers(self, include_held_out: bool) -> dict[str, list[int]]:
        """caption -> the memory rows carrying it; out of fold (include_held_out=False) the fold's own
        held-out images are left out."""
        out: dict[str, list[int]] = {}
        for i, c in zip(self.pair_image.tolist(), self.pair_caption):
            if include_held_out or not self.held_out[i]:
                out.setdefault(c.strip(), []).append(i)
        return out

    def prototypes(self, captions: list[str], scale: float, head_weight: float, tta: bool, alpha: float,
                   include_held_out: bool) -> tuple[np.ndarray, np.ndarray]:
        """((Q, D) unit mean t2i retrieval embedding of each caption's carriers, (Q,) whether it has any)."""
        if scale not in self.embedded:
            raise KeyError(scale)
        e = self.embedded[scale]
        carriers = self.carriers(include_held_out)
        rows = sorted({i for c in captions for i in carriers.get(c.strip(), [])})
        out = np.zeros((len(captions), e.emb.shape[1]), np.float32)
        has = np.zeros(len(captions), bool)
        if not rows:
            return out, has
        sub = Embedded([h[rows] for h in e.head], None if e.prompt is None else [p[rows] for p in e.prompt],
                       e.emb[rows], e.class_emb)
        ret = retrieval_embedding(sub.emb, sub.probs(head_weight, tta), sub.class_emb, alpha)
        at = {r: j for j, r in enumerate(rows)}
        for q, c in enumerate(captions):
            idx = [at[i] for i in carriers.get(c.strip(), [])]
            if idx:
                m = ret[idx].astype(np.float64).mean(0)
                out[q] = m / max(np.linalg.norm(m), 1e-12)
                has[q] = True
        return out, has


def mix_queries(caption_emb: np.ndarray, prototypes: np.ndarray, has: np.ndarray, weight: float) -> np.ndarray:
    """normalise((1 - w) q + w m) for the captions the memory knows; the others unchanged."""
    if weight <= 0 or not has.any():
        return caption_emb
    out = caption_emb.copy()
    m = (1 - weight) * caption_emb[has].astype(np.float64) + weight * prototypes[has].astype(np.float64)
    out[has] = (m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)).astype(caption_emb.dtype)
    return out


def save_memory(path: Path, memory: Memory) -> None:
    arrays = {"images": np.array(memory.images, dtype=str), "held_out": memory.held_out.astype(bool),
              "pair_image": memory.pair_image.astype(np.int64), "pair_caption": np.array(memory.pair_caption, dtype=str),
              "wise_scales": np.array(sorted(memory.embedded), dtype=np.float64)}
    for s, e in memory.embedded.items():
        arrays |= embedded_arrays(e, s)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_memory(path: Path) -> Memory | None:
    """A fold's memory file, or None where the fold has none (trained without infer.memory_weight)."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        scales = [float(s) for s in z["wise_scales"]]
        return Memory(list(z["images"]), z["held_out"], {s: embedded_from(z, s) for s in scales}, z["pair_image"],
                      [str(c) for c in z["pair_caption"]])


def table_pairs(images: list[str], table) -> tuple[np.ndarray, list[str]]:
    """The (caption, image) pairs of `images`, from the release table's captions column."""
    caps = dict(zip(table["image"], table["captions"]))
    rows, texts = [], []
    for i, n in enumerate(images):
        for c in caps.get(n, []):
            rows.append(i)
            texts.append(c)
    return np.array(rows, dtype=np.int64), texts
