"""The joint objective: CE(head) + λp·CE(prompt logits) + λt·multi-positive InfoNCE (or SigLIP's sigmoid
loss) + λi·SupCon."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_positive_ce(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """-log of the softmax mass on each row's positives: 0 once every positive outranks every
    negative, however many positives share a row (a soft-target CE would keep a log|P| floor)."""
    return (logits.logsumexp(-1) - logits.masked_fill(~pos, float("-inf")).logsumexp(-1)).mean()


def multi_positive_infonce(img: torch.Tensor, txt: torch.Tensor, pos: torch.Tensor, scale) -> torch.Tensor:
    """Symmetric image<->text InfoNCE where pos[i, u] marks every caption u that image i carries.

    Identical caption strings are one column, so an image that shares a caption with another is a
    positive for it, never a negative. With one unique caption per image this is the CLIP loss.
    Only images that carry a caption take part: an uncaptioned image may well show the finding.
    """
    keep = pos.any(1)
    img, pos = img[keep], pos[keep]
    if img.shape[0] == 0:
        return img.sum() * 0
    logits = scale * img @ txt.t()
    cols = pos.any(0)
    return (multi_positive_ce(logits, pos) + multi_positive_ce(logits.t()[cols], pos.t()[cols])) / 2


def multi_positive_sigmoid(img: torch.Tensor, txt: torch.Tensor, pos: torch.Tensor, scale, bias) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss where pos[i, u] marks every caption u that image i carries.

    Each (image, caption) pair is a binary decision: label +1 for a positive, -1 otherwise, loss
    -log sigmoid(label * (scale * cos + bias)), summed over the captions and averaged over the images, as
    in SigLIP. Shared captions are one column, positive for every image carrying them. Only images that
    carry a caption take part, as in multi_positive_infonce.
    """
    keep = pos.any(1)
    img, pos = img[keep], pos[keep]
    if img.shape[0] == 0:
        return img.sum() * 0
    logits = scale * img @ txt.t() + bias
    labels = pos.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


def supcon(emb: torch.Tensor, pos: torch.Tensor, scale) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al.) over unit embeddings; pos is (N, N) bool."""
    n = emb.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=emb.device)
    pos = pos & ~eye
    anchors = pos.any(1)
    if not anchors.any():
        return emb.sum() * 0
    logits = (scale * emb @ emb.t()).masked_fill(eye, float("-inf"))
    log_prob = logits.log_softmax(1).masked_fill(eye, 0.0)
    per_anchor = -(log_prob * pos).sum(1)[anchors] / pos.sum(1)[anchors]
    return per_anchor.mean()


def positive_mask(y: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Same class (both labelled) or same i2i component (group >= 0)."""
    same_y = (y[:, None] == y[None, :]) & (y[:, None] >= 0)
    same_g = (group[:, None] == group[None, :]) & (group[:, None] >= 0)
    return same_y | same_g


def caption_targets(all_captions: list[list[str]]) -> tuple[list[str], torch.Tensor]:
    """Unique caption strings of a batch and the (B, U) mask of which image carries which."""
    unique = list(dict.fromkeys(c for caps in all_captions for c in caps))
    col = {c: j for j, c in enumerate(unique)}
    pos = torch.zeros(len(all_captions), len(unique), dtype=torch.bool)
    for i, caps in enumerate(all_captions):
        for c in caps:
            pos[i, col[c]] = True
    return unique, pos


def joint_loss(out: dict, y: torch.Tensor, group: torch.Tensor, text_emb: torch.Tensor | None,
               text_pos: torch.Tensor | None, scale: torch.Tensor, cfg, *, class_weights: torch.Tensor | None = None,
               slerp_views: torch.Tensor | None = None, soft_targets: torch.Tensor | None = None,
               mixed: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The total loss and its parts (floats, for logging). Every λ may be zero.

    Mixup/cutmix: `soft_targets` (B, C) replace the labels of both cross-entropies (their label smoothing
    is already in them); rows `mixed` (B,) bool are left out of both contrastive losses, since a blend of
    two images carries neither's captions nor either's i2i partner, and as a negative it would push away
    half of a positive.

    `slerp_views`: (B, D) extra unit embeddings (image slerped toward its class prompt), or None;
    rows of unlabelled images are ignored. They join both contrastive losses with their image's targets.
    The image-text loss is SigLIP's sigmoid loss when the forward returned a `bias` (the model resolved
    loss.contrastive to sigmoid), else the multi-positive InfoNCE.
    """
    parts = {}
    total = out["emb"].new_zeros(())
    labelled = y >= 0
    if labelled.any():
        target, smoothing = ((y[labelled], cfg.label_smoothing) if soft_targets is None
                             else (soft_targets[labelled], 0.0))
        if cfg.ce:
            parts["ce"] = F.cross_entropy(out["head_logits"][labelled], target, weight=class_weights,
                                          label_smoothing=smoothing)
            total = total + cfg.ce * parts["ce"]
        if cfg.prompt and "prompt_logits" in out:
            parts["prompt"] = F.cross_entropy(out["prompt_logits"][labelled], target, weight=class_weights,
                                              label_smoothing=smoothing)
            total = total + cfg.prompt * parts["prompt"]
    emb = out["emb"]
    tpos = None if text_pos is None else text_pos.to(emb.device)  # built on CPU from caption strings
    if mixed is not None and mixed.any():  # the contrastive losses see the unmixed images only
        keep = ~mixed
        emb, y, group = emb[keep], y[keep], group[keep]
        tpos = None if tpos is None else tpos[keep]
        slerp_views = None if slerp_views is None else slerp_views[keep]
        labelled = y >= 0
    y_all, g_all = y, group
    if slerp_views is not None:
        v = labelled
        emb = torch.cat([emb, slerp_views[v]])
        y_all, g_all = torch.cat([y, y[v]]), torch.cat([group, group[v]])
        if tpos is not None:
            tpos = torch.cat([tpos, tpos[v]])
    if cfg.text and text_emb is not None and text_emb.shape[0] > 0:
        bias = out.get("bias")
        parts["text"] = (multi_positive_infonce(emb, text_emb, tpos, scale) if bias is None
                         else multi_positive_sigmoid(emb, text_emb, tpos, scale, bias))
        total = total + cfg.text * parts["text"]
    if cfg.image:
        pos = positive_mask(y_all, g_all)
        if slerp_views is not None:  # a view and its own image are positives even when unlabelled
            b, m = y.shape[0], int(labelled.sum())
            src = labelled.nonzero().squeeze(1)
            pos[src, b + torch.arange(m, device=pos.device)] = True
            pos[b + torch.arange(m, device=pos.device), src] = True
        parts["image"] = supcon(emb, pos, scale)
        total = total + cfg.image * parts["image"]
    return total, {k: float(v.detach()) for k, v in parts.items()}
