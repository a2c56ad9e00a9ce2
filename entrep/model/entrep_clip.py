"""One CLIP model for classification, image-to-image and text-to-image retrieval."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from entrep.labels import LabelSet
from entrep.model.fusion import CLSFusion

LOGIT_SCALE_MAX = math.log(100.0)
SDPA_BACKENDS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


class EntrepCLIP(nn.Module):
    """backbone (+ LoRA) -> multi-level CLS fusion -> {head logits, prompt logits, embedding}.

    `clip` is an open_clip CLIP, or a peft model wrapping one. The kit's own trainable modules are
    the fusion weights, the linear head and a copy of `logit_scale` (so the base stays frozen).
    """

    def __init__(self, clip: nn.Module, tokenizer, labels: LabelSet, model_cfg, speed_cfg=None):
        super().__init__()
        self.clip = clip
        self.labels = labels
        self.cfg = model_cfg
        self.channels_last = bool(speed_cfg and speed_cfg.channels_last)
        self.sdpa = SDPA_BACKENDS[speed_cfg.sdpa] if speed_cfg and speed_cfg.sdpa != "auto" else None
        base = self.base
        if getattr(base.visual, "attn_pool", None) is not None or not isinstance(base.visual.proj, nn.Parameter):
            raise ValueError("multi-level CLS fusion needs a ViT with a CLS token and a `proj` (open_clip VisionTransformer)")
        n_blocks = len(base.visual.transformer.resblocks)
        self.levels = sorted({(i if i >= 0 else n_blocks + i) for i in model_cfg.fusion.layers})
        if not all(0 <= i < n_blocks for i in self.levels):
            raise ValueError(f"model.fusion.layers {model_cfg.fusion.layers} outside the {n_blocks} blocks")
        if self.levels[-1] != n_blocks - 1:
            self.levels.append(n_blocks - 1)  # fusion starts from the final CLS, so it must be a level
        dim = base.text_projection.shape[1] if isinstance(base.text_projection, nn.Parameter) else base.visual.output_dim
        self.embed_dim = dim
        self.fusion = (CLSFusion(len(self.levels), dim, model_cfg.fusion.mode, model_cfg.fusion.final_logit)
                       if model_cfg.fusion.enabled else None)
        self.head = nn.Linear(dim, len(labels))
        self.logit_scale = nn.Parameter(base.logit_scale.detach().clone().float())
        prompts, owner = [], []
        for c, name in enumerate(labels.names):
            prompts += list(labels.prompts[name])
            owner += [c] * len(labels.prompts[name])
        self.tokenizer = tokenizer
        self.register_buffer("prompt_tokens", tokenizer(prompts), persistent=False)
        self.register_buffer("prompt_owner", torch.tensor(owner), persistent=False)
        self._class_emb: torch.Tensor | None = None
        self._tokens: dict[str, torch.Tensor] = {}  # caption -> token row; captions repeat every epoch

    # ------------------------------------------------------------ towers
    @property
    def base(self) -> nn.Module:
        """The open_clip model (with LoRA layers injected when peft wraps it)."""
        return self.clip.get_base_model() if hasattr(self.clip, "get_base_model") else self.clip

    @property
    def text_trainable(self) -> bool:
        return any(p.requires_grad for p in self.base.transformer.parameters())

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The (unnormalised) image embedding: fused over CLS levels, or CLIP's own when fusion is off."""
        base = self.base
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # The pinned kernel covers the vision tower only: the text tower's causal mask rules out flash.
        with sdpa_kernel(self.sdpa) if self.sdpa else contextlib.nullcontext():
            if self.fusion is None:
                return base.encode_image(images)
            out = base.visual.forward_intermediates(
                images, indices=self.levels, intermediates_only=True, output_fmt="NLC", output_extra_tokens=True)
        cls = torch.stack([t[:, 0] for t in out["image_intermediates_prefix"]], 1)  # B, L, width
        return self.fusion(base.visual.ln_post(cls) @ base.visual.proj)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """open_clip's tokenizer (truncates past the context length, keeps the end-of-text token),
        called once per distinct caption: a batch's rows come from a cache."""
        texts = list(texts)
        if new := list(dict.fromkeys(t for t in texts if t not in self._tokens)):
            self._tokens.update(zip(new, self.tokenizer(new)))
        if not texts:
            return self.tokenizer(texts)
        return torch.stack([self._tokens[t] for t in texts])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.base.encode_text(tokens), dim=-1)

    # ------------------------------------------------------------ class prompts
    def class_embeddings(self) -> torch.Tensor:
        """(C, D) normalised mean of each class's prompt embeddings.

        Recomputed every call while the text tower trains; cached otherwise (eval mode or frozen text).
        """
        live = self.training and self.text_trainable
        if not live and self._class_emb is not None:
            return self._class_emb
        emb = self.encode_text(self.prompt_tokens)
        sums = torch.zeros(len(self.labels), emb.shape[1], dtype=emb.dtype, device=emb.device)
        sums = sums.index_add(0, self.prompt_owner, emb)
        class_emb = F.normalize(sums, dim=-1)
        if not live:
            self._class_emb = class_emb = class_emb.detach()
        return class_emb

    def invalidate_cache(self) -> None:
        self._class_emb = None

    def train(self, mode: bool = True):
        self.invalidate_cache()
        return super().train(mode)

    # ------------------------------------------------------------ one forward for all tasks
    def forward(self, images: torch.Tensor, text_tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Images -> head and prompt logits, fused features, unit embedding; text tokens -> unit
        text embeddings, in the same pass (one forward keeps DDP's gradient hooks in order)."""
        feats = self.image_features(images)
        emb = F.normalize(feats, dim=-1)
        # The scale leaves through the forward too: under DDP a parameter the loss reads from the
        # unwrapped module is "used outside forward" and breaks the gradient reduction.
        scale = self.scale()
        out = {"features": feats, "emb": emb, "head_logits": self.head(feats), "scale": scale}
        if self.cfg.prompts:
            class_emb = self.class_embeddings()
            out["class_emb"] = class_emb
            out["prompt_logits"] = scale * emb @ class_emb.t()
        if text_tokens is not None:
            out["text_emb"] = self.encode_text(text_tokens)
        return out

    # ------------------------------------------------------------ what a fold saves
    def kit_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor that is not a LoRA adapter (peft saves those)."""
        return {n: p.detach().contiguous() for n, p in self.named_parameters()
                if p.requires_grad and "lora_" not in n}

    def load_kit_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise ValueError(f"kit weights name parameters this model lacks: {missing[:5]}")
        with torch.no_grad():
            for n, t in state.items():
                if params[n].shape != t.shape:
                    raise ValueError(f"kit weight {n}: shape {tuple(t.shape)} != model's {tuple(params[n].shape)}")
                params[n].copy_(t)
        self.invalidate_cache()


def build_model(cfg, labels: LabelSet) -> EntrepCLIP:
    """Backbone (frozen) + LoRA or unfrozen last blocks + the kit's modules, from config."""
    from entrep.model.backbone import create_clip
    from entrep.model.lora import apply_lora, unfreeze_last_blocks

    from entrep.config import ConfigError

    clip, tokenizer = create_clip(cfg.model.name, cfg.model.pretrained, cfg.model.offline)
    clip.requires_grad_(False)
    if cfg.train.grad_checkpointing:
        clip.set_grad_checkpointing(True)  # open_clip's own: both towers, non-reentrant torch checkpoint
    try:
        if cfg.model.lora.enabled:
            clip = apply_lora(clip, cfg.model.lora)
        else:
            unfreeze_last_blocks(clip, cfg.model.lora.train_last_blocks)
        model = EntrepCLIP(clip, tokenizer, labels, cfg.model, cfg.speed)
    except ValueError as e:  # what only the architecture can tell: layer indices, targets that match nothing
        raise ConfigError(f"{cfg.model.name}: {e}") from None
    if cfg.speed.channels_last:
        model.to(memory_format=torch.channels_last)  # only 4-D weights change: the patch embedding conv
    return model
