"""peft LoRA on open_clip's towers.

Vision blocks live under `visual.transformer.resblocks.N`, text blocks under `transformer.resblocks.N`.
Attention is an nn.MultiheadAttention. Two ways to adapt it, both peft's own:
- `attn.in_proj_weight` (default): peft's `target_parameters` adds the low-rank delta to the q/k/v
  projection through a parametrization, so the frozen base tensor is never written to;
- `attn`: peft's MultiheadAttention layer (in_proj and out_proj), which merges and unmerges the
  delta into the base weight on every forward and so lets it drift by float rounding.
`out_proj` alone would be a dead adapter: open_clip's attention calls the fused MHA kernel, never
out_proj.forward. Names ending in `_weight`/`.weight` are parameters; the rest are modules.
"""
from __future__ import annotations

import contextlib
import re

from torch import nn

from entrep.config import is_param_target


def lora_target_regex(targets: list[str], text: bool) -> str:
    for t in targets:
        if t.endswith("out_proj"):
            raise ValueError("model.lora.targets: 'out_proj' alone never runs in open_clip's attention; "
                             "target 'attn' (the whole nn.MultiheadAttention) instead")
    towers = r"(visual\.transformer|transformer)" if text else r"visual\.transformer"
    mods = "|".join(re.escape(t) for t in targets)
    return rf"^{towers}\.resblocks\.\d+\.({mods})$"


def apply_lora(clip: nn.Module, cfg):
    """Wrap `clip` in a peft model with the configured adapters; the base stays frozen."""
    import peft

    param_targets = [t for t in cfg.targets if is_param_target(t)]
    module_targets = [t for t in cfg.targets if not is_param_target(t)]
    tower = re.compile(r"^(visual\.transformer|transformer)\." if cfg.text else r"^visual\.transformer\.")
    # peft matches target_parameters by name suffix; full names keep the text tower out when asked
    params = [n for n, _ in clip.named_parameters()
              if tower.match(n) and any(n.endswith("." + t) for t in param_targets)]
    if param_targets and not params:
        raise ValueError(f"model.lora.targets {param_targets} match no parameter of the model")
    config = peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
        target_modules=lora_target_regex(module_targets, cfg.text) if module_targets else None,
        target_parameters=params or None,
    )
    return peft.get_peft_model(clip, config)


def unfreeze_last_blocks(clip: nn.Module, n: int) -> None:
    """Ablation baseline without LoRA: train the last n vision blocks (and ln_post/proj) outright."""
    if n <= 0:
        return
    for blk in clip.visual.transformer.resblocks[-n:]:
        blk.requires_grad_(True)
    clip.visual.ln_post.requires_grad_(True)
    if isinstance(clip.visual.proj, nn.Parameter):
        clip.visual.proj.requires_grad_(True)


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
