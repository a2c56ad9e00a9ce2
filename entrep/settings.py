"""Inference settings: what turns a fold's outputs into predictions. The one reader of tuned.json
(`read_tuned`, `read_blend_tuned`) and of report.json's per-fold settings (`fold_settings`); every
older format of either is read here (`Settings.parse`) and nowhere else.

A `Settings` holds the head weight (head vs class-prompt probabilities), flip TTA, the WiSE scale of
each part (cls, i2i, t2i), the t2i known-pair memory weight, and per retrieval track the slerp alpha
and the re-ranking methods kept. tuning.py chooses them on OOF; report.py writes them; the rest asks
here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from entrep import rundir
from entrep.embedding import DEFAULT_HEAD_WEIGHT
from entrep.io import kit_file, read_json

log = logging.getLogger(__name__)

PARTS = ("cls", "i2i", "t2i")  # what gets its own WiSE scale
TRACKS = ("i2i", "t2i")
# A method is offered only where it means something for the track. With caption queries, k-reciprocal
# would build one neighbour graph over text and image embeddings, whose modality gap leaves its
# Jaccard term without meaning, and alpha-QE would add image vectors to a caption's.
RERANK_OFFERED = {"i2i": ("dba", "qe", "class_bonus", "kreciprocal"), "t2i": ("dba", "class_bonus")}


def offered_methods(rerank_cfg, track: str) -> dict:
    """rerank.methods as configured, less those not offered for the track, with their parameters."""
    from entrep.retrieval import method_params

    return {m: method_params(m, rerank_cfg) for m in rerank_cfg.methods if m in RERANK_OFFERED[track]}


def unit_float(x, what: str) -> float:
    """A weight read from a kit file: a number in [0, 1]."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x <= 1:
        raise ValueError(f"{what} is {x!r}, not a number in [0, 1]")
    return float(x)


def checked_rerank(kept) -> dict:
    """Re-ranking methods as a kit file holds them ({method: params}), each known and with the
    parameters the method takes, cast to their types."""
    from entrep.config import RerankConfig
    from entrep.retrieval import method_params

    out = {}
    for m, params in dict(kept).items():
        want = method_params(m, RerankConfig())  # KeyError: not a method
        out[m] = {k: type(v)(params[k]) for k, v in want.items()}
    return out


@dataclass(frozen=True)
class TrackSettings:
    alpha: float = 0.0
    rerank: dict = field(default_factory=dict)  # kept methods: {method: params}; params None where the file
    # names the method only (report.json's per-fold rows)


@dataclass(frozen=True)
class Settings:
    head_weight: float = DEFAULT_HEAD_WEIGHT
    tta_flip: bool = True
    wise: dict = field(default_factory=lambda: dict.fromkeys(PARTS, 1.0))
    memory_weight: float = 0.0
    i2i: TrackSettings = field(default_factory=TrackSettings)
    t2i: TrackSettings = field(default_factory=TrackSettings)

    def track(self, name: str) -> TrackSettings:
        return getattr(self, name)

    @property
    def alpha(self) -> dict[str, float]:
        return {t: self.track(t).alpha for t in TRACKS}

    def view_kwargs(self) -> dict:
        """FoldOOF.view's keywords."""
        return {"head_weight": self.head_weight, "tta": self.tta_flip, "alpha": self.alpha, "wise": dict(self.wise),
                "memory_weight": self.memory_weight}

    def as_dict(self) -> dict:
        """What infer.py records beside its predictions (meta.json)."""
        return {"tta_flip": self.tta_flip, "head_weight": self.head_weight, "wise": dict(self.wise),
                "memory_weight": self.memory_weight,
                **{t: {"alpha": self.track(t).alpha, "rerank": self.track(t).rerank} for t in TRACKS}}

    def report_row(self) -> dict:
        """report.json's folds[k].settings: what scored fold k (re-ranking by name)."""
        return {"head_weight": self.head_weight, "wise": dict(self.wise), "memory_weight": self.memory_weight,
                **{t: {"alpha": self.track(t).alpha, "rerank": list(self.track(t).rerank)} for t in TRACKS}}

    @classmethod
    def parse(cls, d: dict, tta_flip: bool = True) -> "Settings":
        """Settings from a tuned.json, a blend's tuned.json or a report.json per-fold row, in every format
        the kit has written: per-track alpha and re-ranking (one alpha and one set for both tracks before
        per-track tuning), WiSE scales and memory weight (scale 1 and no memory before them), tta_flip
        (`tta_flip` where the file has none: a report row, or a file from before it), re-ranking as
        tuning's {"kept": {...}} or a list of names. A value of another type raises (io.kit_file names
        the file)."""
        tta = d.get("tta_flip", tta_flip)
        if not isinstance(tta, bool):
            raise TypeError(f"tta_flip is {tta!r}, not true/false")
        tracks = {}
        for t in TRACKS:
            one = d.get(t) or {"alpha": d.get("alpha", 0.0), "rerank": d.get("rerank", {})}
            rerank = one.get("rerank", {})
            if isinstance(rerank, list):
                kept = dict.fromkeys(map(str, rerank))
            else:
                kept = checked_rerank(rerank.get("kept", {}) if "kept" in rerank or not rerank else rerank)
            tracks[t] = TrackSettings(unit_float(one.get("alpha", 0.0), "alpha"), kept)
        wise = d.get("wise", {})
        return cls(unit_float(d.get("head_weight", DEFAULT_HEAD_WEIGHT), "head_weight"), tta,
                   {p: float(wise.get(p, 1.0)) for p in PARTS}, float(d.get("memory_weight", 0.0)), **tracks)

    @classmethod
    def from_tuning(cls, tuned: dict) -> "Settings":
        """The settings tuning.tune chose (its output, before it is written)."""
        return cls.parse(tuned, tuned["tta_flip"])


def read_tuned(run: Path, tta_flip: bool = True) -> Settings | None:
    """A run's (or blend's) tuned.json as settings; None when it has none (no complete OOF report)."""
    path = Path(run) / rundir.TUNED
    if not path.is_file():
        return None
    data = read_json(path)
    with kit_file(path):
        return Settings.parse(data, tta_flip)


def read_blend_tuned(path: Path, parts, n_members: int) -> tuple[dict[str, list[float]], dict[str, dict]]:
    """A blend's tuned.json: (weights per part, one per member; kept re-ranking per track)."""
    f = Path(path) / rundir.TUNED
    tuned = read_json(f)
    with kit_file(f):
        weights = {p: [float(x) for x in tuned["weights"][p]] for p in parts}
        if any(len(w) != n_members for w in weights.values()):
            raise ValueError(f"weights for {n_members} members expected")
        return weights, {t: checked_rerank(tuned[t]["rerank"]["kept"]) for t in TRACKS}


def fold_settings(run: Path, k: int, tta_flip: bool, report: dict | None = None) -> Settings | None:
    """The settings that scored fold k of a run (report.json folds[k].settings, tuned on its other folds;
    `report`: that file already read); None where the report has none for it (no report, or one from
    before per-fold settings)."""
    path = Path(run) / rundir.REPORT
    if report is None:
        if not path.is_file():
            return None
        report = read_json(path)
    with kit_file(path):
        row = next((r for r in report.get("folds", []) if r.get("fold") == k), {})
        return Settings.parse(row["settings"], tta_flip) if "settings" in row else None


def for_inference(cfg, tuned: Settings | None, given: set[str]) -> Settings:
    """The settings infer.py uses: tuned.json's (`tuned`; the config's where the run has none), except
    where the command line sets the key, which always wins: infer.tta_flip, infer.head_weight,
    model.slerp.alpha, model.slerp.infer, rerank.methods; infer.wise_grid or infer.memory_weight of one
    value (a longer grid given at inference tunes nothing: tuning is train.py's re-scoring)."""
    base = tuned or Settings(tta_flip=cfg.infer.tta_flip,
                             **{t: TrackSettings(cfg.model.slerp.alpha) for t in TRACKS})
    tta = cfg.infer.tta_flip if "infer.tta_flip" in given else base.tta_flip
    head = cfg.infer.head_weight if cfg.infer.head_weight >= 0 or tuned is None else base.head_weight
    wise, memory = dict(base.wise), base.memory_weight
    for key, grid in (("infer.wise_grid", cfg.infer.wise_grid), ("infer.memory_weight", cfg.infer.memory_weight)):
        if (key in given or tuned is None) and len(grid) == 1:
            if key == "infer.wise_grid":
                wise = dict.fromkeys(wise, float(grid[0]))
            else:
                memory = float(grid[0])
        elif key in given:
            log.info("%s=%s: a grid is tuned on OOF (train.py re-scoring), not at inference; using tuned.json's "
                     "choice (give one value to force it)", key, grid)
    tracks = {}
    for t in TRACKS:
        alpha, kept = base.track(t).alpha, base.track(t).rerank
        if "model.slerp.alpha" in given:
            alpha = cfg.model.slerp.alpha
        if not cfg.model.slerp.infer:
            alpha = 0.0
        if "rerank.methods" in given:
            kept = offered_methods(cfg.rerank, t)
        tracks[t] = TrackSettings(alpha, kept)
    return Settings(head if head >= 0 else DEFAULT_HEAD_WEIGHT, tta, wise, memory, **tracks)
