"""timm image-only members: `model.name=timm:<timm model name>` builds a timm backbone in the shape of an
open_clip CLIP without a text tower, so the kit's head, fusion, LoRA presets and image losses apply to it.

Such a member has classification and image-to-image retrieval, no text: no class prompts, no caption
losses, no t2i predictions. A blend takes its t2i part from the members that have a text tower.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from entrep.errors import EntrepError

PREFIX = "timm:"
TIMM_PRETRAINED = "timm"  # model.pretrained=timm: timm's own pretrained weights (hub or its cache)


class TimmMemberError(EntrepError):
    pass


def is_timm_member(name: str) -> bool:
    return name.startswith(PREFIX)


def timm_name(name: str) -> str:
    return name[len(PREFIX):]


class ImageOnlyCLIP(nn.Module):
    """A timm image model where open_clip puts a vision tower: `visual` is open_clip's TimmModel around the
    trunk (so the tower families of entrep/model/families.py detect it), `encode_image` its pooled features.
    `logit_scale` (CLIP's initial 1/0.07) is the temperature of the image-image contrastive loss."""

    def __init__(self, trunk: nn.Module, image_size: int):
        super().__init__()
        from open_clip.timm_model import TimmModel

        # TimmModel's constructor builds its own trunk (and resets its pooling); the trunk is built here
        # with timm's defaults, and the adapter's forward, forward_intermediates and head are open_clip's.
        visual = TimmModel.__new__(TimmModel)
        nn.Module.__init__(visual)
        visual.trunk, visual.head, visual.image_size = trunk, nn.Sequential(), (image_size, image_size)
        visual.output_dim = trunk.num_features
        cfg = getattr(trunk, "pretrained_cfg", {}) or {}
        visual.preprocess_cfg = {"mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                                 "std": tuple(cfg.get("std", (0.229, 0.224, 0.225)))}
        self.visual = visual
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)


def native_size(name: str) -> int:
    """The input side timm's pretrained config names for the model (224 where it names none)."""
    import timm

    if not timm.is_model(timm_name(name)):
        raise TimmMemberError(f"model.name={name!r}: timm has no model '{timm_name(name)}' (timm.list_models())")
    cfg = timm.get_pretrained_cfg(timm_name(name))
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return int(size[-1]) if size else 224


def resolve(name: str, pretrained: str) -> str:
    """Where the member's weights will come from (preflight), without building it."""
    native_size(name)
    if not pretrained:
        return "random initialisation (model.pretrained is empty): for tests and smoke runs only"
    if pretrained == TIMM_PRETRAINED:
        import timm

        cfg = timm.get_pretrained_cfg(timm_name(name))
        hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not hub:
            raise TimmMemberError(f"model.pretrained=timm: timm has no hub weights for '{timm_name(name)}'; give a "
                                  f"weights file: model.pretrained=/path/model.safetensors")
        import huggingface_hub as hf

        for f in ("model.safetensors", "pytorch_model.bin"):
            if isinstance(hf.try_to_load_from_cache(hub, f), str):
                return f"timm weights {hub}: cached"
        return f"timm weights {hub}: not cached, downloaded from the hub at build (offline: give a file instead)"
    path = Path(pretrained)
    if not path.is_file():
        raise TimmMemberError(f"model.pretrained={pretrained!r}: not a file nor 'timm' (timm's own weights) for "
                              f"the timm member '{name}'")
    return f"file {pretrained}: {len(_read_state(path))} tensors"


def _read_state(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else {}
    except Exception as e:  # safetensors, pickle and zip readers each raise their own types
        raise TimmMemberError(f"{path}: not a readable weights file ({type(e).__name__}: {str(e)[:160]})") from None


def create(name: str, pretrained: str, offline: bool, image_size: int, seed: int) -> ImageOnlyCLIP:
    """The member in fp32 on CPU: random weights (seeded, so train and infer build the same base), timm's
    own (`timm`), or a state-dict file of the timm model (its classifier, if any, is left out)."""
    import timm

    native = native_size(name)
    size = image_size or native
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            trunk = timm.create_model(timm_name(name), pretrained=pretrained == TIMM_PRETRAINED, num_classes=0)
    except Exception as e:  # timm raises RuntimeError for a hub it cannot reach, TypeError for a bad kwarg
        hint = " (offline: give model.pretrained=/path/model.safetensors)" if pretrained == TIMM_PRETRAINED else ""
        raise TimmMemberError(f"model.name={name!r}: timm could not build it ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''}){hint}") from None
    if pretrained and pretrained != TIMM_PRETRAINED:
        state = _read_state(Path(pretrained))
        try:
            missing, unexpected = trunk.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shapes of another architecture: torch lists every tensor
            raise TimmMemberError(f"{pretrained}: these weights do not fit '{name}' ({str(e).splitlines()[1][:160]} "
                                  f"...)") from None
        unexpected = [k for k in unexpected if not k.startswith(("fc.", "head.", "classifier."))]
        if missing or unexpected:
            raise TimmMemberError(f"{pretrained}: these weights do not fit '{name}' (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
    if size != native and hasattr(trunk, "set_input_size"):
        trunk.set_input_size(img_size=size)  # a ViT resamples its position embeddings; a CNN takes any size
    return ImageOnlyCLIP(trunk, size)
