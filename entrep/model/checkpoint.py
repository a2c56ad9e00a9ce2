"""What a fold saves: peft's adapter folder + the kit's modules as safetensors + metadata, and the
protocol that marks a fold finished: metrics.json is written last, so a fold folder without it is
unfinished whatever else it holds (a crash, a kill, a full disk), and resume trains it again.

Nothing is pickled: adapters and kit weights are safetensors, metadata is JSON.
"""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from safetensors.torch import load_file, save_file

from entrep.errors import EntrepError
from entrep.io import atomic_path, atomic_write_json

KIT_FILE = "kit.safetensors"
ADAPTER_DIR = "adapter"
META_FILE = "meta.json"
METRICS_FILE = "metrics.json"


class CheckpointError(EntrepError):
    pass


def save_weights(model, fold_dir: Path, meta: dict) -> None:
    """Write the adapter + kit weights into `fold_dir`, replacing any earlier ones atomically."""
    import peft

    fold_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model.clip, "save_pretrained"):
        tmp = fold_dir / f".{ADAPTER_DIR}-{uuid.uuid4().hex[:8]}"
        model.clip.save_pretrained(tmp)
        old = fold_dir / f".{ADAPTER_DIR}-old-{uuid.uuid4().hex[:8]}"
        if (fold_dir / ADAPTER_DIR).exists():
            (fold_dir / ADAPTER_DIR).rename(old)
        tmp.rename(fold_dir / ADAPTER_DIR)
        shutil.rmtree(old, ignore_errors=True)
    with atomic_path(fold_dir / KIT_FILE) as tmp:
        save_file(model.kit_state_dict(), str(tmp))
    meta = dict(meta, peft_version=peft.__version__, lora=hasattr(model.clip, "save_pretrained"),
                levels=model.levels, embed_dim=model.embed_dim)
    atomic_write_json(fold_dir / META_FILE, meta)


def fold_dir(run: Path, k: int) -> Path:
    """A run's model folder for fold k: fold<k>, or `full` for the all-data model (k = -1)."""
    return Path(run) / ("full" if k == -1 else f"fold{k}")


def fold_finished(fold_dir: Path) -> bool:
    """metrics.json is written last in a fold, so its presence means the fold is complete."""
    return (fold_dir / METRICS_FILE).is_file()


def mark_finished(fold_dir: Path, metrics: dict) -> None:
    """The fold's last write: after its weights and every other file of the fold."""
    atomic_write_json(fold_dir / METRICS_FILE, metrics)


def read_meta(fold_dir: Path) -> dict:
    return json.loads((fold_dir / META_FILE).read_text())


def check_compatible(meta: dict, cfg, fold_dir: Path) -> None:
    if meta.get("model_name") != cfg.model.name:
        raise CheckpointError(f"{fold_dir}: adapters were trained on base '{meta.get('model_name')}', "
                         f"but the run config names '{cfg.model.name}'")
    if meta.get("labels") != list(cfg.labels.names):
        raise CheckpointError(f"{fold_dir}: trained with labels {meta.get('labels')}, config has {list(cfg.labels.names)}")


def load_fold_weights(model, fold_dir: Path, adapter_name: str) -> None:
    """Load one fold onto `model` (one base for all folds): its adapter via peft, then its kit weights."""
    import peft

    adapter = fold_dir / ADAPTER_DIR
    if adapter.is_dir():
        if not isinstance(model.clip, peft.PeftModel):
            raise CheckpointError(f"{fold_dir} holds a LoRA adapter but the model has no LoRA (model.lora.enabled=false?)")
        if adapter_name not in model.clip.peft_config:
            model.clip.load_adapter(str(adapter), adapter_name=adapter_name)
        model.clip.set_adapter(adapter_name)
    try:
        model.load_kit_state_dict(load_file(str(fold_dir / KIT_FILE)))
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{fold_dir / KIT_FILE}: does not match the base model of the run config: {e}") from e
    model.eval()
