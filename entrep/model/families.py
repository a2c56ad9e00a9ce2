"""Tower families: what the kit needs to know of an open_clip model's towers, found from the built model.

A family is recognised by the classes of the towers (`visual`, `visual.trunk`, the text tower), never by
the model's name. It names where its blocks live (the LoRA scope and `train_last_blocks`), its fusion
levels and how a level becomes an embedding, its tower head and its LoRA preset (`model.lora.targets:
auto`). The objective (softmax or sigmoid loss, logit-scale cap) follows from whether the base has a
`logit_bias`. A tower no record knows is refused in one line, and every name in `open_clip.list_models()`
maps to a record (tests/test_families.py fails when open_clip adds one that does not).

Level kinds:
- "cls": the CLS token of each block through the tower's `ln_post` and `proj` (METHOD.md section 2);
- "tokens": each block's tokens through the tower's own pooling head (attention pool, `map`, average);
- "stages": a CNN. The final stage goes through the tower's own head; earlier stages have other widths,
  which no head takes, so they are average-pooled into a learned Linear that starts at zero.
In every kind the final level is the tower's own image embedding, so step 0 reproduces `encode_image`.
"""
from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from entrep.errors import EntrepError


class FamilyError(EntrepError):
    pass


# ------------------------------------------------------------------ tower heads (what a level passes through)
def _openclip_pool(visual, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip VisionTransformer's own pooling (attention pool or average, with ln_post) and `proj`.
    `_pool` is private, but it is exactly the tower's head; rewriting it would drift from open_clip."""
    pooled = visual._pool(tokens)[0]
    return pooled @ visual.proj if visual.proj is not None else pooled


def _timm_token_head(visual, tokens: torch.Tensor) -> torch.Tensor:
    """A timm ViT trunk's final norm and `forward_head` (token / map / avg pool, fc_norm, head), then
    open_clip's projection: what `forward_features` + `forward_head` do after the last block."""
    return visual.head(visual.trunk.forward_head(visual.trunk.norm(tokens)))


def _timm_widths(visual) -> list[int]:
    return [int(f["num_chs"]) for f in visual.trunk.feature_info]


def _resnet_widths(visual) -> list[int]:
    """ModifiedResNet's forward_intermediates levels: the stem, then layer1..layer4."""
    return [visual.bn3.num_features] + [getattr(visual, f"layer{i}")[-1].bn3.num_features for i in range(1, 5)]


# ------------------------------------------------------------------ records
LevelKind = Literal["cls", "tokens", "stages"]


@dataclass(frozen=True)
class VisionFamily:
    name: str
    examples: str
    detect: Callable[[nn.Module], bool]  # on base.visual
    blocks: str  # regex of one block's module path from the CLIP root
    n_levels: Callable[[nn.Module], int]  # forward_intermediates indices (blocks of a ViT, stages of a CNN)
    level: LevelKind
    head: tuple[str, ...]  # the tower's final head, from the root (train_last_blocks unfreezes it)
    lora: tuple[str, ...]  # preset inside a block: modules, or parameters (names ending _weight/.weight)
    has_cls: bool = False
    token_head: Callable | None = None  # level == "tokens": (visual, (B, N, C) tokens) -> embedding
    widths: Callable | None = None  # level == "stages": channels of each level
    output_fmt: str = "NLC"
    extra_tokens: bool = True  # forward_intermediates(output_extra_tokens=): CNN trunks take no such argument

    @property
    def unit(self) -> str:
        return "stages" if self.level == "stages" else "blocks"


@dataclass(frozen=True)
class TextFamily:
    name: str
    examples: str
    detect: Callable[[nn.Module], bool]  # on the CLIP root
    tower: str  # regex matching the start of every parameter name of the text tower
    blocks: str
    lora: tuple[str, ...]
    tokenizer: str  # what open_clip's own tokenizer needs


@dataclass(frozen=True)
class Objective:
    name: str
    detect: Callable[[nn.Module], bool]
    contrastive: Literal["softmax", "sigmoid"]
    logit_scale_max: float | None  # clamp of the learnable log-scale; None = none


@dataclass(frozen=True)
class Family:
    vision: VisionFamily
    text: TextFamily | None  # None: a timm image-only member (entrep/model/timm_member.py)
    objective: Objective

    @property
    def name(self) -> str:
        return f"{self.vision.name} + {self.text.name if self.text else 'no text tower'}"


def _oc_vit():
    return _oc("transformer", "VisionTransformer")


def _trunk(visual, *classes) -> bool:
    from open_clip.timm_model import TimmModel

    return isinstance(visual, TimmModel) and isinstance(visual.trunk, classes)


def _timm_tokens(visual, *classes) -> bool:
    """A timm token trunk whose pooling is its own (open_clip's abs_attn/rot_attn pool takes a feature map)."""
    return _trunk(visual, *classes) and "pool" not in dict(visual.head.named_children())


def _oc(module: str, cls: str):
    return getattr(importlib.import_module(f"open_clip.{module}"), cls)


def _timm_vit_classes():
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    return VisionTransformer, VisionTransformerRelPos


def _timm(module: str, cls: str):
    return getattr(importlib.import_module(f"timm.models.{module}"), cls)


OPENCLIP_VIT_LORA = ("attn.in_proj_weight", "mlp.c_fc", "mlp.c_proj")  # the order of the kit's first release
TIMM_VIT_LORA = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "mlp.w0", "mlp.w1", "mlp.w2")  # w*: ViTamin's GeGLU
EVA_LORA = ("attn.qkv", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj",
            "mlp.fc1", "mlp.fc1_g", "mlp.fc1_x", "mlp.fc2")  # EVA02: split q/k/v and SwiGLU; EVA01/PE: fused
TIMM_TOKEN_HEAD = ("visual.trunk.norm", "visual.trunk.fc_norm", "visual.trunk.attn_pool", "visual.trunk.head",
                   "visual.head")
_TIMM_BLOCKS = r"visual\.trunk\.blocks\.\d+"

VISION: tuple[VisionFamily, ...] = (
    VisionFamily(
        "openclip-vit-cls", "ViT-B-16-quickgelu, ViT-B-32, ViT-L-14, ViT-H-14-worldwide, coca_base, entrep-tiny",
        lambda v: isinstance(v, _oc_vit()) and v.attn_pool is None and v.pool_type == "tok",
        r"visual\.transformer\.resblocks\.\d+", lambda v: len(v.transformer.resblocks), "cls",
        ("visual.ln_post", "visual.proj"), OPENCLIP_VIT_LORA, has_cls=True),
    VisionFamily(
        "openclip-vit-pooled", "coca_ViT-B-32 (attention pool), ViT-L-14-CLIPA (average pool), entrep-tiny-coca",
        lambda v: isinstance(v, _oc_vit()),
        r"visual\.transformer\.resblocks\.\d+", lambda v: len(v.transformer.resblocks), "tokens",
        ("visual.attn_pool", "visual.attn_pool_contrastive", "visual.ln_post", "visual.proj"), OPENCLIP_VIT_LORA,
        token_head=_openclip_pool),
    VisionFamily(
        "timm-vit-cls", "MobileCLIP-B, MobileCLIP2-L-14, vit_relpos_medium_patch16_cls_224",
        lambda v: _timm_tokens(v, *_timm_vit_classes()) and v.trunk.global_pool == "token",
        _TIMM_BLOCKS, lambda v: len(v.trunk.blocks), "tokens", TIMM_TOKEN_HEAD, TIMM_VIT_LORA, has_cls=True,
        token_head=_timm_token_head),
    VisionFamily(
        "timm-vit-pooled", "ViT-B-16-SigLIP, SigLIP2 (map), vit_medium_patch16_gap_256, ViTamin-S (avg), "
                           "entrep-tiny-sig",
        lambda v: _timm_tokens(v, *_timm_vit_classes()),
        _TIMM_BLOCKS, lambda v: len(v.trunk.blocks), "tokens", TIMM_TOKEN_HEAD, TIMM_VIT_LORA,
        token_head=_timm_token_head),
    VisionFamily(
        "timm-eva-cls", "EVA02-B-16, EVA02-L-14, EVA02-E-14, entrep-tiny-eva",
        lambda v: _timm_tokens(v, _timm("eva", "Eva")) and v.trunk.global_pool == "token",
        _TIMM_BLOCKS, lambda v: len(v.trunk.blocks), "tokens", TIMM_TOKEN_HEAD, EVA_LORA, has_cls=True,
        token_head=_timm_token_head),
    VisionFamily(
        "timm-eva-pooled", "PE-Core-T-16-384 (map), EVA01-g-14 (avg)",
        lambda v: _timm_tokens(v, _timm("eva", "Eva")),
        _TIMM_BLOCKS, lambda v: len(v.trunk.blocks), "tokens", TIMM_TOKEN_HEAD, EVA_LORA,
        token_head=_timm_token_head),
    VisionFamily(
        "timm-convnext", "convnext_base, convnext_large_d, entrep-tiny-convnext",
        lambda v: _trunk(v, _timm("convnext", "ConvNeXt")),
        r"visual\.trunk\.stages\.\d+\.blocks\.\d+", lambda v: len(v.trunk.stages), "stages",
        ("visual.trunk.norm_pre", "visual.trunk.head", "visual.head"), ("mlp.fc1", "mlp.fc2"),
        widths=_timm_widths, output_fmt="NCHW", extra_tokens=False),
    VisionFamily(
        "timm-fastvit", "MobileCLIP-S1, MobileCLIP-S2, MobileCLIP2-S0..S4, entrep-tiny-fastvit",
        lambda v: _trunk(v, _timm("fastvit", "FastVit")),
        r"visual\.trunk\.stages\.\d+\.blocks\.\d+", lambda v: len(v.trunk.stages), "stages",
        ("visual.trunk.final_conv", "visual.trunk.head", "visual.head"),
        ("mlp.fc1", "mlp.fc2", "token_mixer.qkv", "token_mixer.proj"),  # 1x1 convs; attention in the last stage
        widths=_timm_widths, output_fmt="NCHW", extra_tokens=False),
    VisionFamily(
        "timm-swin", "swin_base_patch4_window7_224",
        lambda v: _trunk(v, _timm("swin_transformer", "SwinTransformer")),
        r"visual\.trunk\.layers\.\d+\.blocks\.\d+", lambda v: len(v.trunk.layers), "stages",
        ("visual.trunk.norm", "visual.trunk.head", "visual.head"), ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
        widths=_timm_widths, output_fmt="NCHW", extra_tokens=False),
    VisionFamily(
        "timm-efficientnet", "timm:efficientnet_b0 .. b7, timm:tf_efficientnetv2_*, timm:mobilenetv3_large_100",
        lambda v: _trunk(v, _timm("efficientnet", "EfficientNet"), _timm("mobilenetv3", "MobileNetV3")),
        r"visual\.trunk\.blocks\.\d+\.\d+", lambda v: len(v.trunk.feature_info), "stages",
        ("visual.trunk.conv_head", "visual.trunk.bn2", "visual.head"),
        ("conv_pw", "conv_pwl", "se.conv_reduce", "se.conv_expand"),  # the 1x1 convs; depthwise ones stay frozen
        widths=_timm_widths, output_fmt="NCHW", extra_tokens=False),
    VisionFamily(
        "timm-resnet", "timm:resnet50, timm:resnet18, timm:seresnext50_32x4d, timm:resnet50d",
        lambda v: _trunk(v, _timm("resnet", "ResNet")),
        r"visual\.trunk\.layer[1-4]\.\d+", lambda v: len(v.trunk.feature_info), "stages",
        ("visual.trunk.fc", "visual.head"), ("conv1", "conv2", "conv3"),
        widths=_timm_widths, output_fmt="NCHW", extra_tokens=False),
    VisionFamily(
        "openclip-resnet", "RN50, RN101, RN50x4 .. RN50x64, entrep-tiny-rn",
        lambda v: isinstance(v, _oc("modified_resnet", "ModifiedResNet")),
        # the attention pool stays frozen: it hands its Linear weights to F.multi_head_attention_forward and
        # never calls the modules, so neither a module adapter nor peft's parameter wrapper (active only in
        # the wrapped module's forward) would ever run there
        r"visual\.layer[1-4]\.\d+", lambda v: 5, "stages", ("visual.attnpool",), ("conv1", "conv2", "conv3"),
        widths=_resnet_widths, output_fmt="NCHW", extra_tokens=False),
)

OPENCLIP_TOKENIZER = "open_clip's tokenizer (SimpleTokenizer, or the Hugging Face tokenizer its config names)"
_HF_TOKENIZER = "the Hugging Face tokenizer of the text model (hub, or model.tokenizer=local-dir:)"


def _hf(base, *names) -> bool:
    """The text tower is open_clip's HFTextEncoder around one of these transformers classes."""
    from open_clip.hf_model import HFTextEncoder

    text = getattr(base, "text", None)
    if not isinstance(text, HFTextEncoder):
        return False
    import transformers

    classes = tuple(c for c in (getattr(transformers, n, None) for n in names) if c is not None)
    return isinstance(text.transformer, classes)


def _hf_encoder_stack(base, module: str, cls: str) -> bool:
    """An encoder-decoder's encoder (HFTextEncoder keeps `.encoder` only): classes not exported at top level."""
    from open_clip.hf_model import HFTextEncoder

    text = getattr(base, "text", None)
    if not isinstance(text, HFTextEncoder):
        return False
    try:
        c = getattr(importlib.import_module(f"transformers.models.{module}"), cls)
    except (ImportError, AttributeError):
        return False
    return isinstance(text.transformer, c)


TEXT: tuple[TextFamily, ...] = (
    TextFamily(
        "openclip-text-root", "ViT-B-16-quickgelu, RN50, convnext_base (open_clip CLIP: text at the root)",
        lambda b: isinstance(b, _oc("model", "CLIP")),
        r"(transformer|token_embedding|positional_embedding|ln_final|text_projection)\b",
        r"transformer\.resblocks\.\d+", OPENCLIP_VIT_LORA, OPENCLIP_TOKENIZER),
    TextFamily(
        "openclip-text", "EVA02-B-16, ViT-B-16-SigLIP, MobileCLIP-S1, coca_ViT-B-32 (CustomTextCLIP, CoCa)",
        lambda b: isinstance(getattr(b, "text", None), _oc("transformer", "TextTransformer")),
        r"text\.", r"text\.transformer\.resblocks\.\d+", OPENCLIP_VIT_LORA, OPENCLIP_TOKENIZER),
    TextFamily(
        "hf-bert", "roberta-ViT-B-32, xlm-roberta-base-ViT-B-32, coca_roberta-ViT-B-32",
        lambda b: _hf(b, "BertModel", "RobertaModel", "XLMRobertaModel"),
        r"text\.", r"text\.transformer\.encoder\.layer\.\d+",
        ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense"), _HF_TOKENIZER),
    TextFamily(
        "hf-t5", "mt5-base-ViT-B-32, mt5-xl-ViT-H-14",
        lambda b: (_hf_encoder_stack(b, "mt5.modeling_mt5", "MT5Stack")
                   or _hf_encoder_stack(b, "t5.modeling_t5", "T5Stack")),
        r"text\.", r"text\.transformer\.block\.\d+",
        ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v", "layer.0.SelfAttention.o",
         "layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1",
         "layer.1.DenseReluDense.wo"), _HF_TOKENIZER),
    TextFamily(
        "hf-m2m100", "nllb-clip-base, nllb-clip-base-siglip",
        lambda b: _hf_encoder_stack(b, "m2m_100.modeling_m2m_100", "M2M100Encoder"),
        r"text\.", r"text\.transformer\.layers\.\d+",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
        _HF_TOKENIZER),
)

# HF architectures open_clip's HFTextEncoder knows (open_clip.hf_configs.arch_dict) -> the record that adapts them
HF_ARCHS = {"bert": "hf-bert", "roberta": "hf-bert", "xlm-roberta": "hf-bert", "mt5": "hf-t5", "m2m_100": "hf-m2m100"}

OBJECTIVES: tuple[Objective, ...] = (
    # SigLIP (big_vision) does not clamp its temperature, and released SigLIP scales exceed 100
    # (ViT-SO400M-14-SigLIP-384: exp(4.72) = 112), which a log(100) clamp would cut at step 0.
    Objective("sigmoid (SigLIP: the base has logit_bias)", lambda b: getattr(b, "logit_bias", None) is not None,
              "sigmoid", None),
    Objective("softmax (CLIP)", lambda b: True, "softmax", math.log(100.0)),
)


def detect(base: nn.Module, name: str = "") -> Family:
    """The family of an open_clip model (peft-wrapped or not); one FamilyError line when a tower is unknown."""
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    visual = getattr(base, "visual", None)
    what = f"'{name}'" if name else "the model"
    vision = next((f for f in VISION if visual is not None and f.detect(visual)), None)
    image_only = isinstance(base, _image_only())
    if vision is None:
        inner = getattr(visual, "trunk", None)
        cls = f"{type(visual).__name__}" + (f" with trunk {type(inner).__module__}.{type(inner).__name__}" if inner
                                           is not None else "")
        raise FamilyError(f"EntrepCLIP does not know the vision tower {cls} of {what}: no family names where its "
                          f"blocks live (entrep/model/families.py VISION)")
    text = None if image_only else next((f for f in TEXT if f.detect(base)), None)
    if text is None and not image_only:
        tower = getattr(base, "text", None)
        inner = getattr(tower, "transformer", None)
        cls = type(tower).__name__ + (f" around {type(inner).__name__}" if inner is not None else "")
        raise FamilyError(f"EntrepCLIP does not know the text tower {cls} of {what}: no family names where its "
                          f"blocks live (entrep/model/families.py TEXT)")
    objective = next(o for o in OBJECTIVES if o.detect(base))
    return Family(vision, text, objective)


def _image_only():
    from entrep.model.timm_member import ImageOnlyCLIP

    return ImageOnlyCLIP


# timm module -> the record group of the classes it defines (the records detect those classes)
TIMM_MODULES = {"vision_transformer": "timm-vit", "vision_transformer_hybrid": "timm-vit",
                "vision_transformer_relpos": "timm-vit", "vitamin": "timm-vit", "eva": "timm-eva",
                "convnext": "timm-convnext", "fastvit": "timm-fastvit", "swin_transformer": "timm-swin",
                "efficientnet": "timm-efficientnet", "mobilenetv3": "timm-efficientnet", "resnet": "timm-resnet"}


def classify_config(model_cfg: dict) -> tuple[tuple[str, ...], str]:
    """(candidate vision records, text record) of an open_clip model config, without building it.

    The rule mirrors open_clip's factory: a `timm_model_name` builds a TimmModel around the timm class of
    the module that registers the name (a ViT's pool, token or not, decides between the -cls and -pooled
    records; an empty `timm_pool` keeps the timm model's default, so both stay candidates), a list of
    `layers` a ModifiedResNet, else a VisionTransformer. `hf_model_name` builds an HFTextEncoder whose
    architecture only its hub config names ("hf": see HF_ARCHS); `custom_text` (CustomTextCLIP, CoCa) puts
    the text tower under `text`. An unknown timm module gives no candidate.
    """
    v, t = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if v.get("timm_model_name"):
        import timm.models

        from entrep.model.backbone import TINY_TIMM

        timm_name = TINY_TIMM.get(v["timm_model_name"], (v["timm_model_name"],))[0]  # a tiny one: its base's module
        group = next((g for mod, g in TIMM_MODULES.items() if timm.models.is_model_in_modules(timm_name, [mod])), None)
        pool = v.get("timm_pool", "avg")  # open_clip's CLIPVisionCfg default
        if group in ("timm-vit", "timm-eva"):
            vision = ((f"{group}-cls",) if pool == "token" else (f"{group}-pooled",) if pool
                      else (f"{group}-cls", f"{group}-pooled"))
        else:
            vision = (group,) if group else ()
    elif isinstance(v.get("layers"), (list, tuple)):
        vision = ("openclip-resnet",)
    else:
        pooled = v.get("attentional_pool") or v.get("pool_type", "tok") != "tok"
        vision = ("openclip-vit-pooled",) if pooled else ("openclip-vit-cls",)
    if t.get("hf_model_name"):
        text = "hf"
    elif model_cfg.get("custom_text"):  # CustomTextCLIP, or CoCa with a multimodal_cfg
        text = "openclip-text"
    else:
        text = "openclip-text-root"
    return vision, text


def blocks(root: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    """The modules whose path (from the CLIP root) is one block, in model order."""
    rx = re.compile(pattern)
    return [(n, m) for n, m in root.named_modules() if rx.fullmatch(n)]
