"""open_clip backbone: model by name, weights from a tag, a local file or a `local-dir:` folder."""
from __future__ import annotations

import os
from pathlib import Path
from entrep.errors import EntrepError

CONFIG_DIR = Path(__file__).parent / "configs"  # tiny randomly initialised configs for tests and the demo


RANDOM_INIT_SEED = 0


class WeightsError(EntrepError):
    pass


def set_offline(offline: bool) -> None:
    """HF_HUB_OFFLINE is read when huggingface_hub is imported, so set it before importing open_clip."""
    if not offline:
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys

    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True  # imported earlier by someone else: update the constant it read


def _open_clip():
    import open_clip

    if "entrep-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
    return open_clip


def offline_hint(name: str, pretrained: str) -> str:
    return (f"could not load weights '{pretrained}' for '{name}'. Without network access, point at local "
            f"weights: model.pretrained=/path/to/open_clip_model.safetensors (or .bin/.pt), or "
            f"model.pretrained=local-dir:/folder holding open_clip_config.json and the weights "
            f"(e.g. a Kaggle dataset). To cache them once on a machine with network: "
            f"python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{pretrained}')\"")


def create_clip(name: str, pretrained: str = "", offline: bool = False):
    """An open_clip CLIP model in fp32 on CPU, plus its tokenizer.

    `ViT-B-16` from a weights file silently builds GELU; OpenAI weights need QuickGELU, so any
    name containing 'quickgelu' forces it, whatever the weight source.
    """
    set_offline(offline)
    open_clip = _open_clip()
    force_quick_gelu = "quickgelu" in name.lower()
    kwargs = dict(force_quick_gelu=force_quick_gelu)
    try:
        if pretrained.startswith("local-dir:"):
            folder = Path(pretrained[len("local-dir:"):])
            if not (folder / "open_clip_config.json").is_file():
                raise WeightsError(f"{folder}: a local-dir: folder needs open_clip_config.json beside the weights")
            model = open_clip.create_model(pretrained, **kwargs)
            tokenizer = open_clip.get_tokenizer(pretrained)
            return model, tokenizer
        if pretrained and not Path(pretrained).is_file() and pretrained not in open_clip.list_pretrained_tags_by_model(name):
            raise WeightsError(f"model.pretrained={pretrained!r} is neither a file nor an open_clip tag of "
                               f"'{name}' (tags: {open_clip.list_pretrained_tags_by_model(name)})")
        if pretrained:
            model = open_clip.create_model(name, pretrained=pretrained, **kwargs)
        else:
            import torch

            # Random weights must be the same at train and infer time, or saved adapters sit on another base.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model = open_clip.create_model(name, **kwargs)
    except WeightsError:
        raise
    except Exception as e:
        if pretrained and not Path(pretrained).is_file():
            raise WeightsError(offline_hint(name, pretrained) + f" ({type(e).__name__}: {e})") from e
        raise
    return model, open_clip.get_tokenizer(name)


def image_stats(model) -> tuple[tuple, tuple, int]:
    """(mean, std, image size) from the model's preprocess config."""
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return tuple(pp.get("mean", OPENAI_DATASET_MEAN)), tuple(pp.get("std", OPENAI_DATASET_STD)), int(size)
