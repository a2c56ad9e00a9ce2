"""peft LoRA on open_clip's towers, scoped to the blocks the tower family names (entrep/model/families.py).

`model.lora.targets: auto` takes the family's preset per tower; an explicit list is matched inside the
blocks of the vision tower (and of the text tower with `model.lora.text`). Names ending in `_weight` /
`.weight` are parameters, adapted through peft's `target_parameters` (a parametrization adds the low-rank
delta to the weight, so the frozen base tensor is never written to); the rest are modules.

open_clip's ViT attention is an nn.MultiheadAttention. `attn.in_proj_weight` (the preset) adapts q/k/v as
a parameter; `attn` takes peft's MultiheadAttention layer (in_proj and out_proj), which merges and unmerges
the delta into the base weight on every forward and so lets it drift by float rounding. `out_proj` of an
nn.MultiheadAttention alone would be a dead adapter: the fused kernel never calls out_proj.forward.
A tower that is adapted but gets no adapter is refused: it would train as a silent full freeze.
"""
from __future__ import annotations

import contextlib
import re

from torch import nn

from entrep.config import is_param_target
from entrep.model.families import Family, blocks, detect


def _is_auto(targets) -> bool:
    return list(targets) == ["auto"]


def tower_targets(family: Family, cfg) -> dict[str, tuple[str, tuple[str, ...]]]:
    """tower -> (block regex, targets inside a block) for the adapted towers."""
    auto = _is_auto(cfg.targets)
    out = {"vision": (family.vision.blocks, family.vision.lora if auto else tuple(cfg.targets))}
    if cfg.text and family.text is not None:  # an image-only member has no text tower to adapt
        out["text"] = (family.text.blocks, family.text.lora if auto else tuple(cfg.targets))
    return out


def plan(clip: nn.Module, family: Family, cfg) -> tuple[list[str], list[str], dict[str, int]]:
    """The module and parameter names peft will adapt, and how many adapters each tower gets."""
    if "auto" in cfg.targets and not _is_auto(cfg.targets):
        raise ValueError(f"model.lora.targets {cfg.targets}: 'auto' (the family's preset) stands alone")
    modules = dict(clip.named_modules())
    params = [n for n, _ in clip.named_parameters()]
    mod_names, param_names, counts = [], [], {}
    for tower, (block, inside) in tower_targets(family, cfg).items():
        mods = "|".join(re.escape(t) for t in inside if not is_param_target(t))
        ps = "|".join(re.escape(t) for t in inside if is_param_target(t))
        m_rx = re.compile(rf"{block}\.({mods})") if mods else None
        p_rx = re.compile(rf"{block}\.({ps})") if ps else None
        found_m = [n for n in modules if m_rx and m_rx.fullmatch(n)]
        found_p = [n for n in params if p_rx and p_rx.fullmatch(n)]
        for n in found_m:
            parent, _, leaf = n.rpartition(".")
            if leaf == "out_proj" and isinstance(modules.get(parent), nn.MultiheadAttention):
                raise ValueError(f"model.lora.targets: '{n}' is the out_proj of an nn.MultiheadAttention, which "
                                 f"its fused kernel never calls (a dead adapter); target 'attn' (the whole layer) "
                                 f"or 'attn.in_proj_weight' instead")
        mod_names += found_m
        param_names += found_p
        counts[tower] = len(found_m) + len({n.rpartition(".")[0] for n in found_p})
    empty = [t for t, n in counts.items() if n == 0]
    if empty:
        towers = " and ".join(f"the {t} tower ({family.vision.name if t == 'vision' else family.text.name}, blocks "
                              f"{tower_targets(family, cfg)[t][0]})" for t in empty)
        raise ValueError(f"model.lora.targets {cfg.targets} put no adapter in {towers}: it would train frozen; "
                         f"use model.lora.targets=auto (the family's preset)"
                         + (" or model.lora.text=false" if "text" in empty else ""))
    # peft adds one adapter per parameter's module, in named_parameters order: keep that order
    return mod_names, [n for n in params if n in set(param_names)], counts


def apply_lora(clip: nn.Module, cfg, family: Family | None = None):
    """Wrap `clip` in a peft model with the configured adapters; the base stays frozen."""
    import peft

    family = family or detect(clip)
    mod_names, param_names, counts = plan(clip, family, cfg)
    if cfg.dropout and param_names:
        raise ValueError(f"model.lora.dropout = {cfg.dropout} cannot apply to the parameter target(s) of "
                         f"{family.name} ({sorted({n.rpartition('.')[2] for n in param_names})}"
                         f": peft adapts the weight, not an input); set model.lora.dropout=0, or target modules only, "
                         f"e.g. model.lora.targets=[attn,mlp.c_fc,mlp.c_proj]")
    # one anchored alternation of the exact module names: peft's regex match then adapts those and no others
    config = peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
        target_modules="^(" + "|".join(re.escape(n) for n in mod_names) + ")$" if mod_names else None,
        target_parameters=param_names or None,
    )
    wrapped = peft.get_peft_model(clip, config)
    # peft matches target_parameters by name suffix, and a text-root name is a suffix of the vision one:
    # check that every adapter sits where the plan put it
    planned = tuple(mod_names) + tuple(n.rpartition(".")[0] for n in param_names)
    stray = [n for n, _ in wrapped.get_base_model().named_modules()
             if n.endswith(".lora_A") and not n[:-len(".lora_A")].startswith(planned)]
    if stray:
        raise ValueError(f"model.lora.targets {cfg.targets}: peft put adapters outside the planned layers: {stray[:3]}")
    return wrapped


def adapter_counts(model: nn.Module, family: Family | None = None) -> dict[str, int]:
    """Adapted layers per tower, {"vision": N, "text": M}, of an EntrepCLIP, a peft model or an open_clip model."""
    base = getattr(model, "base", model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    family = family or getattr(model, "family", None) or detect(base)
    text = re.compile(family.text.tower) if family.text is not None else None
    counts = {"vision": 0, "text": 0}
    for n, _ in base.named_modules():
        if n.endswith(".lora_A"):
            if n.startswith("visual."):
                counts["vision"] += 1
            elif text is not None and text.match(n):
                counts["text"] += 1
    return counts


def unfreeze_last_blocks(clip: nn.Module, n: int, family: Family | None = None) -> None:
    """Without LoRA: train the last n vision blocks and the tower's head outright (the ablation baseline),
    or with n = -1 the whole vision tower (full fine-tuning, e.g. of a timm CNN)."""
    if n == -1:
        clip.visual.requires_grad_(True)
        return
    if n <= 0:
        return
    family = family or detect(clip)
    for _, blk in blocks(clip, family.vision.blocks)[-n:]:
        blk.requires_grad_(True)
    for path in family.vision.head:
        try:
            part = clip.get_submodule(path)
        except AttributeError:
            try:
                part = clip.get_parameter(path)
            except AttributeError:
                continue  # a head part this member lacks (e.g. no attention pool)
        if part is not None:
            part.requires_grad_(True)


@contextlib.contextmanager
def merged(clip: nn.Module):
    """Inference with the active adapter folded into the base weights (peft merge/unmerge).

    Saves the low-rank matmuls of every forward; unmerging afterwards leaves the base off by
    float rounding (~1e-7), which is why it is an option and off by default.
    """
    if not hasattr(clip, "merge_adapter"):
        yield
        return
    clip.merge_adapter()
    try:
        yield
    finally:
        clip.unmerge_adapter()
