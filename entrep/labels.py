"""The label set: class names in official index order, prompts, and left/right swap pairs.

Everything here comes from config, so another label set runs with no code change.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ENTREP_CLASSES = ["nose-right", "nose-left", "ear-right", "ear-left", "vc-open", "vc-closed", "throat"]

ENTREP_PROMPTS = {
    "nose-right": [
        "an endoscopic image of the right nasal cavity",
        "an endoscopic view of the right nostril with the septum and turbinates",
        "nasal endoscopy of the right side of the nose",
    ],
    "nose-left": [
        "an endoscopic image of the left nasal cavity",
        "an endoscopic view of the left nostril with the septum and turbinates",
        "nasal endoscopy of the left side of the nose",
    ],
    "ear-right": [
        "an otoscopic image of the right ear canal and tympanic membrane",
        "an endoscopic view of the right eardrum",
        "ear endoscopy of the right ear",
    ],
    "ear-left": [
        "an otoscopic image of the left ear canal and tympanic membrane",
        "an endoscopic view of the left eardrum",
        "ear endoscopy of the left ear",
    ],
    "vc-open": [
        "a laryngoscopic image of open vocal cords",
        "an endoscopic view of the larynx with the vocal cords abducted",
        "open glottis seen during laryngoscopy",
    ],
    "vc-closed": [
        "a laryngoscopic image of closed vocal cords",
        "an endoscopic view of the larynx with the vocal cords adducted",
        "closed glottis seen during laryngoscopy",
    ],
    "throat": [
        "an endoscopic image of the throat",
        "an endoscopic view of the pharynx and the back of the throat",
        "oropharynx seen during endoscopy",
    ],
}

ENTREP_SWAP = [["nose-right", "nose-left"], ["ear-right", "ear-left"]]


@dataclass(frozen=True)
class LabelSet:
    names: tuple[str, ...]
    prompts: dict[str, tuple[str, ...]]
    swap: tuple[tuple[str, str], ...]

    @classmethod
    def from_config(cls, cfg) -> "LabelSet":
        names = tuple(cfg.names)
        if len(set(names)) != len(names):
            raise ValueError(f"labels.names has duplicates: {names}")
        prompts = {n: tuple(cfg.prompts.get(n) or (f"an image of {n}",)) for n in names}
        extra = set(cfg.prompts) - set(names)
        if extra:
            raise ValueError(f"labels.prompts names classes not in labels.names: {sorted(extra)}")
        swap = []
        for pair in cfg.swap:
            if len(pair) != 2 or not set(pair) <= set(names):
                raise ValueError(f"labels.swap pair {pair} must name two classes of labels.names {list(names)}")
            swap.append((pair[0], pair[1]))
        return cls(names, prompts, tuple(swap))

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        return self.names.index(name)

    @property
    def swap_perm(self) -> np.ndarray:
        """perm[i] = index of the class that class i becomes under a horizontal flip."""
        perm = np.arange(len(self.names))
        for a, b in self.swap:
            ia, ib = self.index(a), self.index(b)
            perm[ia], perm[ib] = ib, ia
        return perm

    def flip_probs(self, probs):
        """Reorder the class columns of a flipped view's probabilities (numpy or torch)."""
        return probs[..., self.swap_perm]
