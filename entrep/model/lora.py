"""peft LoRA on open_clip's towers.

Targets are regexes over open_clip module names: vision blocks live under
`visual.transformer.resblocks.N`, text blocks under `transformer.resblocks.N`. `attn` is an
nn.MultiheadAttention, which peft adapts as a whole (in_proj and out_proj). `out_proj` alone
would be a dead adapter: open_clip's attention calls the fused MHA kernel, never out_proj.forward.
"""
from __future__ import annotations

import re

from torch import nn


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

    config = peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=lora_target_regex(cfg.targets, cfg.text), bias="none",
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
