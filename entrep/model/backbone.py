"""open_clip backbone: model by name, weights from a tag, a local file or a `local-dir:` folder."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import NamedTuple

from entrep.errors import EntrepError
from entrep.model import timm_member
from entrep.model.timm_member import is_timm_member

CONFIG_DIR = Path(__file__).parent / "configs"  # tiny randomly initialised configs for tests and the demo


RANDOM_INIT_SEED = 0


class WeightsError(EntrepError):
    pass


class TokenizerError(EntrepError):
    pass


def set_offline(offline: bool) -> None:
    """HF_HUB_OFFLINE is read when huggingface_hub is imported, so set it before importing open_clip."""
    if not offline:
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True  # imported earlier by someone else: update the constant it read


def _open_clip():
    import open_clip

    if "entrep-tiny" not in open_clip.list_models():
        _register_tiny_timm()
        open_clip.add_model_config(CONFIG_DIR)
    return open_clip


# The tiny configs' timm towers: a real family member's timm entrypoint at toy sizes. open_clip's TimmModel
# passes no architecture arguments to timm, so a size has to be a registered timm name.
TINY_TIMM = {
    "entrep_tiny_sig_vit": ("vit_base_patch16_siglip_224",
                            dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2)),
    "entrep_tiny_eva02": ("eva02_base_patch16_clip_224",
                          dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2, ref_feat_shape=(8, 8))),
    "entrep_tiny_fastvit_mci": ("fastvit_mci1", dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128))),
}


def _register_tiny_timm() -> None:
    import timm
    from timm.models import register_model

    for name, (base, sizes) in TINY_TIMM.items():
        if timm.is_model(name):
            continue

        def entrypoint(pretrained=False, _base=base, _sizes=sizes, **kwargs):
            return timm.create_model(_base, pretrained=False, **dict(_sizes, **kwargs))

        entrypoint.__name__ = entrypoint.__qualname__ = name
        register_model(entrypoint)


def offline_hint(name: str, pretrained: str) -> str:
    return (f"could not load weights '{pretrained}' for '{name}'. Without network access, point at local "
            f"weights: model.pretrained=/path/to/open_clip_model.safetensors (or .bin/.pt), or "
            f"model.pretrained=local-dir:/folder holding open_clip_config.json and the weights "
            f"(e.g. a Kaggle dataset). To cache them once on a machine with network: "
            f"python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{pretrained}')\"")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_weights_file(path: Path) -> int:
    """Read a weights file's tensor index without building a model; returns the tensor count.

    One line naming the file instead of torch's UnpicklingError (which even suggests
    weights_only=False) or safetensors' header error. Nothing is unpickled: weights_only=True.
    """
    import torch

    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}; fix model.pretrained (a file, local-dir:/folder or a tag)")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            if not isinstance(state, dict):
                raise TypeError(f"holds a {type(state).__name__}, not a state dict")
            keys = list(state)
    except Exception as e:  # safetensors, pickle and zip readers each raise their own types
        raise WeightsError(f"{path}: not a readable weights file ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                           f"re-download it or export open_clip weights with safetensors.torch.save_file") from None
    if not any("visual." in k or "transformer." in k for k in keys):
        raise WeightsError(f"{path}: {len(keys)} tensors, none of them an open_clip CLIP's (visual.*, transformer.*): "
                           f"not CLIP weights")
    return len(keys)


def base_weights_file(pretrained: str) -> Path | None:
    """The local file `model.pretrained` loads (a file, or a `local-dir:` folder's weights), which a fold's
    adapters are tied to; None for random weights and hub tags (the hub cache is content-addressed)."""
    if not pretrained:
        return None
    if pretrained.startswith("local-dir:"):
        folder = Path(pretrained[len("local-dir:"):])
        files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []
        return next((p for p in files if p.name.startswith("open_clip_")), files[0] if files else None)
    path = Path(pretrained)
    return path if path.suffix in WEIGHT_SUFFIXES or path.is_file() else None


def resolve_weights(name: str, pretrained: str, offline: bool = False, timeout: float = 10.0) -> str:
    """Where `model.pretrained` will come from, checked without building the model (preflight).

    A tag must be in the local hub cache or reachable; a file must be readable weights; a
    `local-dir:` folder must hold open_clip_config.json and a weights file; a Hugging Face text tower's
    config.json must be local, cached or reachable. Otherwise one WeightsError line with the fix.
    """
    if is_timm_member(name):
        return timm_member.resolve(name, pretrained)
    where = _resolve_clip_weights(name, pretrained, offline, timeout)
    try:
        model_cfg = model_config(name, pretrained)
    except WeightsError:
        return where
    hf = _hf_text_source(name, model_cfg, offline, timeout)
    return where + (f"; text tower {model_cfg['text_cfg']['hf_model_name']}: {hf}" if hf else "")


def _resolve_clip_weights(name: str, pretrained: str, offline: bool, timeout: float) -> str:
    set_offline(offline)
    if not pretrained:
        return "random initialisation (model.pretrained is empty): for tests and smoke runs only"
    if pretrained.startswith("local-dir:"):
        folder = Path(pretrained[len("local-dir:"):])
        if not folder.is_dir():
            raise WeightsError(f"local-dir folder not found: {folder}; fix model.pretrained=local-dir:/folder")
        try:
            json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{folder}/open_clip_config.json: missing or without 'model_cfg' ({type(e).__name__}); "
                               f"a local-dir: folder holds open_clip_config.json beside the weights") from None
        files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if not files:
            raise WeightsError(f"{folder}: no weights file (open_clip_model.safetensors or open_clip_pytorch_model.bin)")
        weights = next((p for p in files if p.name.startswith("open_clip_")), files[0])
        return f"local-dir {folder}: {weights.name}, {check_weights_file(weights)} tensors"
    if Path(pretrained).suffix in WEIGHT_SUFFIXES or Path(pretrained).exists():
        return f"file {pretrained}: {check_weights_file(Path(pretrained))} tensors"
    open_clip = _open_clip()
    if pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise WeightsError(f"model.pretrained={pretrained!r} is neither a file nor an open_clip tag of '{name}' "
                           f"(tags: {open_clip.list_pretrained_tags_by_model(name)})")
    hub = open_clip.get_pretrained_cfg(name, pretrained).get("hf_hub", "")
    if not hub:
        raise WeightsError(f"{name}/{pretrained} downloads from a URL, not a hub: run the training once online, or "
                           + offline_hint(name, pretrained))
    import huggingface_hub as hf

    repo, filename = hub.rstrip("/").split("/", 2)[:2], hub.rstrip("/").split("/")[2:]
    repo = "/".join(repo)
    candidates = filename or ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for f in candidates:
        cached = hf.try_to_load_from_cache(repo, f)
        if isinstance(cached, str):
            return f"tag {pretrained}: cached at {cached}"
    if offline:
        raise WeightsError("offline and not cached: " + offline_hint(name, pretrained))
    try:
        meta = hf.get_hf_file_metadata(hf.hf_hub_url(repo, candidates[0]), timeout=timeout)
    except Exception as e:  # DNS, proxy, timeout, HTTP errors: all mean "not from here"
        raise WeightsError(f"hub unreachable ({type(e).__name__}): " + offline_hint(name, pretrained)) from None
    return f"tag {pretrained}: reachable on the hub ({repo}/{candidates[0]}, {(meta.size or 0) / 2**20:.0f} MiB to download)"


@contextlib.contextmanager
def _no_random_init_warning():
    """open_clip warns on the root logger that no weights were loaded; with model.pretrained="" that is
    what was asked for, and the warning would repeat on every fold."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def model_config(name: str, pretrained: str = "") -> dict:
    """The open_clip config the model is built from: a `local-dir:` folder's, or the registered name's."""
    if pretrained.startswith("local-dir:"):
        path = Path(pretrained[len("local-dir:"):]) / "open_clip_config.json"
        try:
            return json.loads(path.read_text())["model_cfg"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{path}: missing or without 'model_cfg' ({type(e).__name__}); a local-dir: folder "
                               f"holds open_clip_config.json beside the weights") from None
    cfg = _open_clip().get_model_config(name)
    if cfg is None:
        raise WeightsError(f"model.name={name!r} is not an open_clip model config (open_clip.list_models())")
    return cfg


def _hub_files(repo: str, files: tuple[str, ...], offline: bool, timeout: float = 10.0) -> str:
    """'cached' or 'reachable' for a Hugging Face repo's files; otherwise OSError with the reason. Asked
    before transformers is, since its hub client retries for about a minute before it gives up."""
    import huggingface_hub as hf

    if any(isinstance(hf.try_to_load_from_cache(repo, f), str) for f in files):
        return "cached"
    if offline:
        raise OSError("not in the local hub cache, and model.offline=true")
    try:
        hf.get_hf_file_metadata(hf.hf_hub_url(repo, files[0]), timeout=timeout)
    except Exception as e:  # DNS, proxy, timeout, HTTP errors: all mean "not from here"
        raise OSError(f"neither in the local hub cache nor reachable ({type(e).__name__})") from None
    return "reachable"


def _cache_hint(code: str) -> str:
    return f'or cache it once on a machine with network: python -c "{code}"'


def _hub_tokenizer(name: str, pretrained: str, text_cfg: dict, offline: bool) -> str:
    """'cached' / 'reachable' for a tokenizer open_clip takes from the hub, '' for a local one."""
    repo = text_cfg.get("hf_tokenizer_name", "")
    if not repo or pretrained.startswith("local-dir:") or Path(repo).is_dir():
        return ""
    try:
        return _hub_files(repo, ("tokenizer_config.json", "tokenizer.json"), offline)
    except OSError as e:
        raise TokenizerError(
            f"model.tokenizer: '{name}' tokenizes with the Hugging Face tokenizer '{repo}', which is {e}; give "
            f"its files locally with model.tokenizer=local-dir:/folder (tokenizer.json, tokenizer_config.json), "
            + _cache_hint(f"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('{repo}')")
        ) from None


def load_tokenizer(name: str, pretrained: str = "", spec: str = "", offline: bool = False,
                   before_model: bool = False):
    """The tokenizer of the model: open_clip's own (`model.tokenizer` empty) or Hugging Face tokenizer files
    in `model.tokenizer=local-dir:/folder`, with the model's context length and tokenizer options.
    Anything that cannot load is one TokenizerError line naming model.tokenizer. `before_model`: only check
    that it can come from where it must (a build then fails before it spends minutes on the weights)."""
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer

    set_offline(offline)
    open_clip = _open_clip()
    source = pretrained if pretrained.startswith("local-dir:") else name
    try:
        text_cfg = model_config(name, pretrained).get("text_cfg", {})
    except WeightsError as e:
        raise TokenizerError(f"model.tokenizer: no model config to take the context length from ({e})") from None
    if spec:
        folder = Path(spec[len("local-dir:"):])
        if not spec.startswith("local-dir:") or not folder.is_dir():
            raise TokenizerError(f"model.tokenizer={spec!r}: give local-dir:/folder holding Hugging Face tokenizer "
                                 f"files (tokenizer.json, tokenizer_config.json), or leave it empty for open_clip's "
                                 f"tokenizer of '{name}'")
        if before_model:
            return None
        try:
            return HFTokenizer(str(folder), context_length=text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH),
                               tokenizer_mode=text_cfg.get("tokenizer_mode"), **text_cfg.get("tokenizer_kwargs", {}))
        except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a bad folder
            raise TokenizerError(f"model.tokenizer={spec}: not a Hugging Face tokenizer folder ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:160] if str(e) else ''}); save one with "
                                 f"PreTrainedTokenizerFast(...).save_pretrained(folder)") from None
    if _hub_tokenizer(name, pretrained, text_cfg, offline) == "cached" and not before_model:
        set_offline(True)  # the model is built by now: nothing else will ask the hub
    if before_model:
        return None
    try:
        return open_clip.get_tokenizer(source)
    except Exception as e:
        raise TokenizerError(f"model.tokenizer: open_clip's tokenizer of '{source}' did not load ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else ''}); give one with "
                             f"model.tokenizer=local-dir:/folder") from None


def describe_tokenizer(tokenizer) -> str:
    inner = getattr(tokenizer, "tokenizer", None)
    vocab = len(inner) if inner is not None else getattr(tokenizer, "vocab_size", "?")
    source = getattr(inner, "name_or_path", "") if inner is not None else ""
    return (f"{type(tokenizer).__name__}{f' {source}' if source else ''}: vocabulary {vocab}, "
            f"context {getattr(tokenizer, 'context_length', '?')}")


def check_tokenizer(cfg) -> str:
    """What `model.tokenizer` resolves to, loaded without building the model (preflight); one TokenizerError
    line when it cannot load."""
    m = cfg.model
    if is_timm_member(m.name):
        return "none: a timm image-only member has no text tower"
    return describe_tokenizer(load_tokenizer(m.name, m.pretrained, m.tokenizer, m.offline))


def _hf_text_source(name: str, model_cfg: dict, offline: bool, timeout: float = 10.0) -> str:
    """'cached' / 'reachable' for an HF text tower's config.json (AutoConfig reads it even for random
    weights), '' when the tower is not HF or names a local folder; one WeightsError line otherwise."""
    repo = model_cfg.get("text_cfg", {}).get("hf_model_name", "")
    if not repo or Path(repo).is_dir():
        return ""
    try:
        return _hub_files(repo, ("config.json",), offline, timeout)
    except OSError as e:
        raise WeightsError(
            f"'{name}': its text tower is the Hugging Face model '{repo}', whose config.json is {e}; give it locally: "
            f"model.pretrained=local-dir:/folder whose open_clip_config.json names local folders (config.json, "
            f"tokenizer files) in text_cfg.hf_model_name and hf_tokenizer_name, "
            + _cache_hint(f"from transformers import AutoConfig; AutoConfig.from_pretrained('{repo}')")) from None


def create_clip(name: str, pretrained: str = "", offline: bool = False, tokenizer: str = "", image_size: int = 0):
    """An open_clip CLIP model in fp32 on CPU, plus its tokenizer (`tokenizer`: model.tokenizer), at the
    input side `image_size` (0: the model's own); a `timm:` image-only member, with no tokenizer.

    `ViT-B-16` from a weights file silently builds GELU; OpenAI weights need QuickGELU, so any
    name containing 'quickgelu' forces it, whatever the weight source.
    """
    set_offline(offline)
    if is_timm_member(name):
        return check_patch_grid(timm_member.create(name, pretrained, offline, image_size, RANDOM_INIT_SEED), name), None
    model = check_patch_grid(_create_open_clip(name, pretrained, offline, tokenizer, image_size), name)
    return model, load_tokenizer(name, pretrained, tokenizer, offline)


def patch_side(visual) -> int | None:
    """The patch side of a ViT-like vision tower (open_clip's, or a timm trunk's patch_embed); None for a CNN."""
    embed = getattr(getattr(visual, "trunk", None), "patch_embed", None)
    size = getattr(embed, "patch_size", None) if embed is not None else getattr(visual, "patch_size", None)
    return _side(size) if size else None


def check_patch_grid(model, name: str):
    """A ViT's input side must be a whole number of patches: timm asserts in the first forward pass, and
    open_clip's stride silently drops the last pixels. Refused in one line with the nearest sides."""
    p, side = patch_side(model.visual), _side(getattr(model.visual, "image_size", 0) or 0)
    if p and side % p:
        lo, hi = side // p * p, (side // p + 1) * p
        raise WeightsError(f"model.image_size={side} is not a multiple of the {p} px patches of '{name}'; use "
                           f"{lo if lo >= p else hi} or {hi}")
    return model


def _create_open_clip(name: str, pretrained: str, offline: bool, tokenizer: str, image_size: int):
    open_clip = _open_clip()
    force_quick_gelu = "quickgelu" in name.lower()
    kwargs = dict(force_quick_gelu=force_quick_gelu)
    model_cfg = model_config(name, pretrained)
    native = _side(model_cfg["vision_cfg"]["image_size"])
    timm_tower = bool(model_cfg["vision_cfg"].get("timm_model_name"))
    if image_size and image_size != native and not timm_tower:
        kwargs["force_image_size"] = image_size  # open_clip resamples a ViT's position embeddings as weights load
    hf_text = _hf_text_source(name, model_cfg, offline)
    load_tokenizer(name, pretrained, tokenizer, offline, before_model=True)
    try:
        if pretrained.startswith("local-dir:"):
            if hf_text == "cached":
                set_offline(True)
            return _sized(open_clip.create_model(pretrained, **kwargs), image_size, native, name)
        if pretrained and not Path(pretrained).is_file() and pretrained not in open_clip.list_pretrained_tags_by_model(name):
            raise WeightsError(f"model.pretrained={pretrained!r} is neither a file nor an open_clip tag of "
                               f"'{name}' (tags: {open_clip.list_pretrained_tags_by_model(name)})")
        weights_need_hub = False
        if pretrained and Path(pretrained).is_file():
            check_weights_file(Path(pretrained))
        elif pretrained:
            # a tag: fail at once when it is neither cached nor reachable (the hub client would retry
            # for about a minute), and read a cached copy without asking the network again
            if resolve_weights(name, pretrained, offline).startswith(f"tag {pretrained}: cached"):
                set_offline(True)
            else:
                weights_need_hub = True
        if hf_text == "cached" and not weights_need_hub:
            set_offline(True)  # the hub client would ask the network first, and retry for a minute without one
        if pretrained:
            model = open_clip.create_model(name, pretrained=pretrained, **kwargs)
        else:
            import torch

            # Random weights must be the same at train and infer time, or saved adapters sit on another base.
            # pretrained_text=False: an HF text tower would otherwise fetch its pretrained weights.
            with torch.random.fork_rng(devices=[]), _no_random_init_warning():
                torch.manual_seed(RANDOM_INIT_SEED)
                model = open_clip.create_model(name, pretrained_text=False, **kwargs)
    except WeightsError:
        raise
    except Exception as e:
        if pretrained and not Path(pretrained).is_file():
            raise WeightsError(offline_hint(name, pretrained) + f" ({type(e).__name__}: {e})") from e
        if pretrained and "state_dict" in str(e):  # another architecture's weights: torch lists every key
            lines = str(e).splitlines()
            raise WeightsError(f"{pretrained}: these weights do not fit '{name}' ({lines[0][:160]} ...): "
                               f"check model.name against the weights' architecture") from None
        raise
    return _sized(model, image_size, native, name)


def _side(size) -> int:
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _sized(model, image_size: int, native: int, name: str):
    """A timm-trunk tower at model.image_size: timm resamples its position embeddings (set_input_size);
    a tower that cannot change its input side is one line."""
    if not image_size or image_size == native or _side(model.visual.image_size) == image_size:
        return model
    if not hasattr(model.visual, "set_input_size"):
        raise WeightsError(f"model.image_size={image_size}: the vision tower of '{name}' cannot change its input "
                           f"side ({native} px); leave model.image_size=0")
    model.visual.set_input_size(image_size)
    return model


def input_size(name: str, pretrained: str = "", image_size: int = 0) -> int:
    """The model's input side (model.image_size, else its own config's), without building it (the decoded
    cache is made before the first fold's model exists)."""
    if image_size:
        return image_size
    if is_timm_member(name):
        return timm_member.native_size(name)
    return _side(model_config(name, pretrained)["vision_cfg"]["image_size"])


class ImageStats(NamedTuple):
    """What the eval transform and the augmentation need of a model: normalisation and input side."""
    mean: tuple
    std: tuple
    size: int


def image_stats(model) -> ImageStats:
    """(mean, std, image size) from the model's preprocess config."""
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ImageStats(tuple(pp.get("mean", OPENAI_DATASET_MEAN)), tuple(pp.get("std", OPENAI_DATASET_STD)), int(size))
