"""One CLIP model for classification, image-to-image and text-to-image retrieval."""
from __future__ import annotations

import contextlib
import logging
import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from entrep.labels import LabelSet
from entrep.model.families import Family, detect
from entrep.model.fusion import CLSFusion, StageProjection

SIGLIP_INIT_BIAS = -10.0  # SigLIP's (and open_clip_train --siglip's) logit_bias init, for a base without one
SDPA_BACKENDS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def embed_dim(base: nn.Module) -> int:
    """The joint embedding width: the text projection's output (the image tower's matches it)."""
    tp = getattr(base, "text_projection", None)
    if isinstance(tp, nn.Parameter):
        return tp.shape[1]
    if isinstance(tp, nn.Linear):
        return tp.out_features
    text = getattr(base, "text", None)
    return int(getattr(text, "output_dim", None) or base.visual.output_dim)


class EntrepCLIP(nn.Module):
    """backbone (+ LoRA) -> multi-level fusion -> {head logits, prompt logits, embedding}.

    `clip` is an open_clip CLIP (any tower family of entrep/model/families.py), or a peft model wrapping
    one. The kit's own trainable modules are the fusion weights (and a CNN's stage projections), the linear
    head, and copies of `logit_scale` and, for a sigmoid loss, `logit_bias` (so the base stays frozen).
    `contrastive`: the resolved loss.contrastive ("auto" = the family's).
    """

    def __init__(self, clip: nn.Module, tokenizer, labels: LabelSet, model_cfg, speed_cfg=None,
                 contrastive: str = "auto"):
        super().__init__()
        self.clip = clip
        self.labels = labels
        self.cfg = model_cfg
        self.channels_last = bool(speed_cfg and speed_cfg.channels_last)
        self.sdpa = SDPA_BACKENDS[speed_cfg.sdpa] if speed_cfg and speed_cfg.sdpa != "auto" else None
        base = self.base
        self.family: Family = detect(base, model_cfg.name)
        vision = self.family.vision
        n_levels = vision.n_levels(base.visual)
        self.levels = sorted({(i if i >= 0 else n_levels + i) for i in model_cfg.fusion.layers})
        if not all(0 <= i < n_levels for i in self.levels):
            raise ValueError(f"model.fusion.layers {model_cfg.fusion.layers} outside the {n_levels} {vision.unit} "
                             f"of {vision.name} (indices 0..{n_levels - 1}, or negative from the end)")
        if self.levels[-1] != n_levels - 1:
            self.levels.append(n_levels - 1)  # fusion starts from the tower's own embedding, so it must be a level
        dim = embed_dim(base)
        self.embed_dim = dim
        self.fusion = (CLSFusion(len(self.levels), dim, model_cfg.fusion.mode, model_cfg.fusion.final_logit)
                       if model_cfg.fusion.enabled else None)
        self.stage_proj = (StageProjection([vision.widths(base.visual)[i] for i in self.levels[:-1]], dim)
                           if self.fusion is not None and vision.level == "stages" else None)
        self.head = nn.Linear(dim, len(labels))
        self.logit_scale = nn.Parameter(base.logit_scale.detach().clone().float())
        self.logit_scale_max = self.family.objective.logit_scale_max
        self.contrastive = self.family.objective.contrastive if contrastive == "auto" else contrastive
        if self.contrastive == "sigmoid":
            bias = getattr(base, "logit_bias", None)
            self.logit_bias = nn.Parameter(bias.detach().clone().float() if bias is not None
                                           else torch.full_like(self.logit_scale, SIGLIP_INIT_BIAS))
        else:
            self.logit_bias = None
        self.has_text = self.family.text is not None
        self.uses_prompts = bool(model_cfg.prompts) and self.has_text  # class prompts need a text tower
        prompts, owner = [], []
        for c, name in enumerate(labels.names):
            prompts += list(labels.prompts[name])
            owner += [c] * len(labels.prompts[name])
        self.tokenizer = tokenizer
        if self.has_text:
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
        if not self.has_text:
            return False
        tower = re.compile(self.family.text.tower)
        return any(p.requires_grad for n, p in self.base.named_parameters() if tower.match(n))

    @property
    def lora_counts(self) -> dict[str, int]:
        """Adapted layers per tower, {"vision": N, "text": M} (zero without LoRA)."""
        from entrep.model.lora import adapter_counts

        return adapter_counts(self.base, self.family)

    def scale(self) -> torch.Tensor:
        if self.logit_scale_max is None:
            return self.logit_scale.exp()
        return self.logit_scale.clamp(max=self.logit_scale_max).exp()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The (unnormalised) image embedding: fused over the family's levels, or CLIP's own when fusion is off."""
        base = self.base
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # The pinned kernel covers the vision tower only: the text tower's causal mask rules out flash.
        with sdpa_kernel(self.sdpa) if self.sdpa else contextlib.nullcontext():
            if self.fusion is None:
                return base.encode_image(images)
            return self.fusion(self.level_features(images))

    def level_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, L, D): one embedding per fusion level, the last being the tower's own image embedding."""
        visual, vision = self.base.visual, self.family.vision
        if vision.level == "cls":
            out = visual.forward_intermediates(
                images, indices=self.levels, intermediates_only=True, output_fmt="NLC", output_extra_tokens=True)
            cls = torch.stack([t[:, 0] for t in out["image_intermediates_prefix"]], 1)  # B, L, width
            return visual.ln_post(cls) @ visual.proj
        # the final level is the tower's own head on the full forward: exactly encode_image's features
        extra = {"output_extra_tokens": True} if vision.extra_tokens else {}
        out = visual.forward_intermediates(images, indices=self.levels, intermediates_only=False,
                                           output_fmt=vision.output_fmt, **extra)
        earlier = out["image_intermediates"][:-1]
        if vision.level == "tokens":
            prefix = out.get("image_intermediates_prefix") or [None] * len(earlier)
            feats = [vision.token_head(visual, x if p is None or p.shape[1] == 0 else torch.cat([p, x], 1))
                     for p, x in zip(prefix, earlier)]
        else:
            feats = self.stage_proj(earlier)
        return torch.stack([*feats, out["image_features"]], 1)

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
        super().train(mode)
        # BatchNorm keeps its running statistics: a fold saves trainable tensors only, so statistics updated
        # in training would be lost at reload (and small batches would make them noise)
        for m in self.base.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

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
        if self.logit_bias is not None:  # the sigmoid loss reads it: it leaves through the forward too
            out["bias"] = self.logit_bias
        if self.uses_prompts:
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
    from entrep.config import ConfigError
    from entrep.errors import EntrepError
    from entrep.model.backbone import create_clip
    from entrep.model.lora import apply_lora, unfreeze_last_blocks

    clip, tokenizer = create_clip(cfg.model.name, cfg.model.pretrained, cfg.model.offline, cfg.model.tokenizer,
                                  cfg.model.image_size)
    clip.requires_grad_(False)
    if cfg.train.grad_checkpointing:
        clip.set_grad_checkpointing(True)  # open_clip's own: both towers, non-reentrant torch checkpoint
    try:
        family = detect(clip, cfg.model.name)
        if family.text is None:
            say_text_settings_ignored(cfg)
            if not (cfg.loss.ce or cfg.loss.image):  # its text-side losses do not apply: nothing left to train
                raise ConfigError(f"{cfg.model.name} has no text tower, so loss.prompt and loss.text do not apply, "
                                  f"and loss.ce and loss.image are 0: nothing would train; give loss.ce a weight")
        if cfg.model.tokenizer and tokenizer is not None:
            check_vocabulary(tokenizer, clip, cfg.model.tokenizer)
        if cfg.model.lora.enabled:
            clip = apply_lora(clip, cfg.model.lora, family)
        else:
            unfreeze_last_blocks(clip, cfg.model.lora.train_last_blocks, family)
        model = EntrepCLIP(clip, tokenizer, labels, cfg.model, cfg.speed, contrastive=cfg.loss.contrastive)
    except EntrepError:  # already one line naming the key (tokenizer, unknown tower family)
        raise
    except ValueError as e:  # what only the architecture can tell: layer indices, LoRA targets
        raise ConfigError(f"{cfg.model.name}: {e}") from None
    if cfg.speed.channels_last:
        model.to(memory_format=torch.channels_last)  # only 4-D weights change: a ViT's patch embedding, a CNN's convs
    return model


def check_vocabulary(tokenizer, clip: nn.Module, spec: str) -> None:
    """A tokenizer of model.tokenizer whose ids exceed the text tower's embedding table would fail at the first
    caption with an IndexError."""
    from entrep.model.backbone import TokenizerError

    text = getattr(clip, "text", clip)
    tower = getattr(text, "vocab_size", None)
    ids = id_span(tokenizer)
    if tower and ids and ids > tower:
        raise TokenizerError(f"model.tokenizer{'=' + spec if spec else ''}: {ids} token ids (its largest is {ids - 1}), "
                             f"but the text tower embeds {tower}; use the model's own tokenizer or one whose ids "
                             f"stay below {tower}")


def id_span(tokenizer) -> int | None:
    """1 + the largest id the tokenizer can emit: a vocabulary with gaps (or special tokens numbered past it)
    emits ids above its length, which the embedding table must hold."""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "get_vocab"):
        ids = [*inner.get_vocab().values(), *(i for i in getattr(inner, "all_special_ids", []) if i is not None)]
        return max(ids) + 1 if ids else None
    return len(inner) if inner is not None else getattr(tokenizer, "vocab_size", None)


_SAID: set[str] = set()


def say_text_settings_ignored(cfg) -> None:
    """An image-only member takes the config of a CLIP member as it is (one config serves both kinds of
    blend member), so its text-only settings are named once, not refused."""
    on = [k for k, v in (("model.prompts", cfg.model.prompts), ("loss.prompt", cfg.loss.prompt),
                         ("loss.text", cfg.loss.text), ("model.slerp.train", cfg.model.slerp.train),
                         ("model.slerp.infer", cfg.model.slerp.infer), ("model.tokenizer", cfg.model.tokenizer)) if v]
    if cfg.model.name in _SAID:
        return
    _SAID.add(cfg.model.name)
    logging.getLogger("entrep.model").warning(
        "%s has no text tower: it trains and predicts classification and i2i only, no t2i%s", cfg.model.name,
        f"; these settings do not apply to it: {', '.join(on)}" if on else "")
