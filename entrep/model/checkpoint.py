"""What a fold saves: peft's adapter folder + the kit's modules as safetensors + metadata, and the
protocol that marks a fold finished: metrics.json is written last, so a fold folder without it is
unfinished whatever else it holds, and resume trains it again. A fold folder is written as one unit
(io.atomic_dir): a crash, a kill or a full disk leaves the earlier folder as it was, never a mix.

Nothing is pickled: adapters and kit weights are safetensors, metadata is JSON. Before a fold is
used, every file it is loaded from is checked (`verify_fold`), so a damaged fold is one line naming
the file, never another fold's adapter left active, nor peft asking the hub for a missing file.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from entrep.errors import EntrepError
from entrep.io import atomic_dir, atomic_write_json, kit_file, read_json
from entrep.rundir import (ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, HISTORY, KIT_FILE, MEMORY_FILE, META_FILE,
                           METRICS_FILE, OOF_FILE)

# what a fold folder holds (training.train_fold writes the last three); anything else is not the kit's
FOLD_FILES = {ADAPTER_DIR, KIT_FILE, META_FILE, METRICS_FILE, HISTORY, OOF_FILE, MEMORY_FILE}


class CheckpointError(EntrepError):
    pass


def _os_error(e: SafetensorError, path: Path) -> Exception:
    """safetensors reports a failed write (a full disk) as SafetensorError('... (os error 28)'): the
    OSError it is, naming the file."""
    m = re.search(r"os error (\d+)", str(e))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1))), str(path)) if m else e


def write_weights(model, folder: Path, meta: dict) -> None:
    """The adapter + kit weights + meta.json into `folder`, a fold folder being written (atomic_dir's
    temp folder: this is never the folder in use)."""
    import peft

    lora = hasattr(model.clip, "save_pretrained")
    if lora:
        try:
            model.clip.save_pretrained(folder / ADAPTER_DIR)
        except SafetensorError as e:
            raise _os_error(e, folder / ADAPTER_DIR / ADAPTER_WEIGHTS) from e
    try:
        save_file(model.kit_state_dict(), str(folder / KIT_FILE))
    except SafetensorError as e:
        raise _os_error(e, folder / KIT_FILE) from e
    atomic_write_json(folder / META_FILE, dict(meta, peft_version=peft.__version__, lora=lora, levels=model.levels,
                                               embed_dim=model.embed_dim))


def save_weights(model, fold_dir: Path, meta: dict) -> None:
    """Write the adapter + kit weights into `fold_dir`, replacing the earlier fold folder as one unit
    (its metrics.json included: new weights are an unfinished fold until their metrics are written)."""
    with atomic_dir(fold_dir, FOLD_FILES) as tmp:
        write_weights(model, tmp, meta)


def fold_dir(run: Path, k: int) -> Path:
    """A run's model folder for fold k: fold<k>, or `full` for the all-data model (k = -1)."""
    return Path(run) / ("full" if k == -1 else f"fold{k}")


def fold_index(fold_dir: Path) -> int:
    return -1 if fold_dir.name == "full" else int(fold_dir.name.removeprefix("fold"))


def fold_finished(fold_dir: Path) -> bool:
    """metrics.json is written last in a fold, so its presence means the fold is complete."""
    return (fold_dir / METRICS_FILE).is_file()


def mark_finished(fold_dir: Path, metrics: dict) -> None:
    """The fold's last write: after its weights and every other file of the fold."""
    atomic_write_json(fold_dir / METRICS_FILE, metrics)


def read_meta(fold_dir: Path) -> dict:
    return read_json(fold_dir / META_FILE)


def check_safetensors(path: Path) -> str | None:
    """None if `path` is a complete safetensors file (its header parses and its size is what the header
    says), else why not; reads the header only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > 100 * 2**20:
                return f"not a safetensors file (header length {n})"
            if 8 + n > size:
                return f"truncated ({size} bytes, shorter than its header of {n})"
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as e:
        return f"not a safetensors file (header: {type(e).__name__})"
    if 8 + n + max(ends, default=0) != size:
        return f"truncated or padded ({size} bytes; its header says {8 + n + max(ends, default=0)})"
    return None


def verify_fold(fold_dir: Path, lora_enabled: bool) -> dict:
    """Every file a finished fold is loaded from, checked before any is used; returns its meta.
    meta.json says whether the fold has LoRA; then adapter/adapter_config.json and
    adapter_model.safetensors, and kit.safetensors, must be present and complete."""
    run, k = fold_dir.parent, fold_index(fold_dir)
    fix = (f"retrain the fold (train.py --name {run.name} output_dir={run.parent} train.folds=[{k}]), or move "
           f"{fold_dir} away and pass infer.partial=use to ensemble the other folds")
    try:
        meta = read_meta(fold_dir)
        with kit_file(fold_dir / META_FILE):
            lora = meta.get("lora", (fold_dir / ADAPTER_DIR).is_dir())  # older metas: the folder says
            if not isinstance(lora, bool):
                raise TypeError(f"'lora' is {lora!r}, not true/false")
    except EntrepError as e:
        raise CheckpointError(f"{e}; {fix}") from None
    if lora != lora_enabled:
        raise CheckpointError(f"{fold_dir} was trained {'with' if lora else 'without'} LoRA, but the run config "
                              f"says model.lora.enabled={str(lora_enabled).lower()}; {fix}")
    files = [fold_dir / KIT_FILE]
    if lora:
        try:
            read_json(fold_dir / ADAPTER_DIR / ADAPTER_CONFIG)
        except EntrepError as e:
            raise CheckpointError(f"{e}; {fix}") from None
        files.insert(0, fold_dir / ADAPTER_DIR / ADAPTER_WEIGHTS)
    for f in files:
        if (why := check_safetensors(f)) is not None:
            raise CheckpointError(f"{f}: {why}; {fix}")
    return meta


def check_compatible(meta: dict, cfg, fold_dir: Path) -> None:
    """The fold was trained as the config says: the same base model, labels in the same order, and the
    same base weights file (its fingerprint at training, where the fold's meta.json has one)."""
    from entrep.io import fingerprint
    from entrep.model.backbone import base_weights_file

    if "base_fingerprint" in meta and (base := base_weights_file(cfg.model.pretrained)) is not None:
        if not base.is_file():
            raise CheckpointError(f"{fold_dir}: its base weights {base} (model.pretrained) are not found; a "
                                  f"relative path is read from the current folder")
        if fingerprint(base) != meta["base_fingerprint"]:
            raise CheckpointError(f"{fold_dir}: trained on the base weights {base} as they were then; that file has "
                                  f"changed since, and the fold's adapters and head are tied to the old one: put "
                                  f"it back, or retrain (train.py --name {fold_dir.parent.name} "
                                  f"output_dir={fold_dir.parent.parent})")
    if meta.get("model_name") != cfg.model.name:
        raise CheckpointError(f"{fold_dir}: adapters were trained on base '{meta.get('model_name')}', "
                              f"but the run config names '{cfg.model.name}'")
    if meta.get("labels") != list(cfg.labels.names):
        raise CheckpointError(f"{fold_dir}: trained with labels {meta.get('labels')}, config has {list(cfg.labels.names)}")


def load_fold_weights(model, fold_dir: Path, adapter_name: str) -> None:
    """Load one fold onto `model` (one base for all folds): its adapter via peft, then its kit weights.
    A fold without an adapter on a model with LoRA is refused: the adapter of the fold loaded before
    would still be active."""
    import peft

    adapter = fold_dir / ADAPTER_DIR
    has_lora = isinstance(getattr(model, "clip", None), peft.PeftModel)
    if adapter.is_dir():
        if not has_lora:
            raise CheckpointError(f"{fold_dir} holds a LoRA adapter but the model has no LoRA (model.lora.enabled=false?)")
        if adapter_name not in model.clip.peft_config:
            for f in (adapter / ADAPTER_CONFIG, adapter / ADAPTER_WEIGHTS):  # else peft would ask the hub for it
                if not f.is_file():
                    raise CheckpointError(f"{f}: missing; retrain fold {fold_dir.name}")
            model.clip.load_adapter(str(adapter), adapter_name=adapter_name)
        model.clip.set_adapter(adapter_name)
    elif has_lora:
        raise CheckpointError(f"{adapter}: missing, but the model has LoRA; retrain fold {fold_dir.name}")
    if (why := check_safetensors(fold_dir / KIT_FILE)) is not None:  # never handed to a loader unchecked
        raise CheckpointError(f"{fold_dir / KIT_FILE}: {why}; retrain fold {fold_dir.name}")
    try:
        model.load_kit_state_dict(load_file(str(fold_dir / KIT_FILE)))
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{fold_dir / KIT_FILE}: does not match the base model of the run config: {e}") from e
    model.eval()
