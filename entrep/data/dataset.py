"""Torch datasets over decoded images, with endoscopy augmentations and the laterality-aware flip."""
from __future__ import annotations

import random
import re

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from entrep.labels import LabelSet

_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_sides(text: str) -> str:
    """'left' <-> 'right' in a caption, keeping case: a flipped image's caption must still be true."""
    def repl(m):
        w = m.group(0)
        new = "right" if w.lower() == "left" else "left"
        return new.capitalize() if w[0].isupper() else new
    return _SIDE.sub(repl, text)


def eval_transform(size: int, mean, std) -> T.Compose:
    return T.Compose([T.Resize(size, antialias=True), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


class TrainDataset(Dataset):
    """One item per record: the decoded uint8 image (possibly flipped), its label, its captions.

    The flip swaps the label (nose-left <-> nose-right) and the words left/right in the caption,
    so image, label and text stay consistent. A flipped view drops its i2i group, because its
    partner is not flipped and no longer shows the same side. The other augmentations run per batch
    (`TrainCollate`, or on the device), where they cost far less than per image.
    """

    def __init__(self, pixels: np.ndarray, *, y: np.ndarray, captions: list[list[str]], groups: np.ndarray,
                 index: np.ndarray, labels: LabelSet, hflip: bool):
        """pixels: (N, H, W, 3) uint8; y: class index or -1 (unlabelled); captions: each image's caption
        lines; groups: i2i component or -1; index: each row's position in the run's table."""
        self.pixels, self.y, self.captions, self.groups, self.index = pixels, y, captions, groups, index
        self.hflip = hflip
        self.perm = labels.swap_perm

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        img = torch.from_numpy(self.pixels[i]).permute(2, 0, 1)
        y, group, caps = int(self.y[i]), int(self.groups[i]), list(self.captions[i])
        if self.hflip and random.random() < 0.5:
            img = img.flip(-1)
            y = int(self.perm[y]) if y >= 0 else y
            caps = [swap_sides(c) for c in caps]
            group = -1
        return {"image": img, "y": y, "all_captions": caps,
                "group": group, "index": int(self.index[i])}


class ConcatRows:
    """Two pixel stores read as one, row by row (a fold's training images, then its pseudo-labelled test
    images), without copying either into one array."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.first[i] if i < len(self.first) else self.second[i - len(self.first)]


class EvalDataset(Dataset):
    """Decoded uint8 images as they are; the eval transform runs batched, on the model's device."""

    def __init__(self, pixels: np.ndarray, index: np.ndarray):
        self.pixels, self.index = pixels, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.from_numpy(self.pixels[i]).permute(2, 0, 1), "index": int(self.index[i])}


def collate(items: list[dict]) -> dict:
    out = {"image": torch.stack([it["image"] for it in items]),
           "index": torch.tensor([it["index"] for it in items])}
    if "y" in items[0]:
        out["y"] = torch.tensor([it["y"] for it in items])
        out["group"] = torch.tensor([it["group"] for it in items])
        out["all_captions"] = [it["all_captions"] for it in items]
    return out


class TrainCollate:
    """collate, then the batch augmentation when it runs in the loader (a worker, or the main
    process with num_workers=0); with `augment=None` the uint8 batch goes to the device as is."""

    def __init__(self, augment=None):
        self.augment = augment

    def __call__(self, items: list[dict]) -> dict:
        batch = collate(items)
        if self.augment is not None:
            batch["image"] = self.augment(batch["image"])
        return batch
