"""Dataclass config: YAML file + dotted `key=value` overrides, validated, dumped to the run dir."""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from entrep.errors import EntrepError
from entrep.io import atomic_write_text
from entrep.labels import ENTREP_CLASSES, ENTREP_PROMPTS, ENTREP_SWAP


class ConfigError(EntrepError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans (true/false only): YAML 1.1 reads no/off/yes/on as booleans too, which
    made `train.mixed_precision=no` the string 'False'. Boolean fields still accept yes/no.
    A key repeated in one mapping is refused: PyYAML keeps the last, so a second `train:` section
    silently dropped the first (a whole run at default learning rates)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice in one mapping (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}); the second would silently replace the first: merge them",
                    key_node.start_mark)
            seen.setdefault(key, key_node.start_mark.line)
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:bool"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def opt(default=None, help: str = "", factory=None):
    """A config field and its help text (`train.py --print-config`, `--help`)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


# Every choice lives in its type: `_cast` checks a Literal field's value against its arguments.
BadImages = Literal["skip", "error"]
LabelConflicts = Literal["error", "unlabel"]
FusionMode = Literal["softmax", "concat"]
Contrastive = Literal["auto", "softmax", "sigmoid"]
Precision = Literal["auto", "no", "fp16", "bf16"]
Monitor = Literal["f1_macro", "accuracy", "f1_weighted", "none"]
EmaWarmup = Literal["debiased", "timm", "tf"]
Parallel = Literal["ddp", "folds", "auto"]
Partial = Literal["refuse", "use"]
Search = Literal["torch", "faiss-flat", "faiss-ivf", "faiss-hnsw"]
AugmentOn = Literal["auto", "device", "loader"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
Sdpa = Literal["auto", "math", "flash", "efficient", "cudnn"]
RerankMethod = Literal["dba", "qe", "class_bonus", "kreciprocal"]
Tracker = Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "trackio", "swanlab", "all"]
RERANK_METHODS = typing.get_args(RerankMethod)
MAX_SIM_BYTES = 256 * 2**20  # default bound on one similarity block (retrieval's defaults too)


@dataclass
class LabelsConfig:
    names: list[str] = opt(help="class names in the official index order", factory=lambda: list(ENTREP_CLASSES))
    prompts: dict[str, list[str]] = opt(help="text prompts per class (their normalised mean is the class embedding)",
                                        factory=lambda: {k: list(v) for k, v in ENTREP_PROMPTS.items()})
    swap: list[list[str]] = opt(help="class pairs a horizontal flip exchanges (left/right)",
                                factory=lambda: [list(p) for p in ENTREP_SWAP])


@dataclass
class DataConfig:
    root: str = opt("data/entrep", "training release folder (train.py --data overrides it)")
    working_size: int = opt(0, "decoded-cache side in px; 0 = 1.15 x the model's input side")
    cache_dir: str = opt("", "decoded-image cache folder; empty = <output_dir>/.image_cache")
    num_workers: int = opt(0, "DataLoader worker processes (0 = the main process)")
    bad_images: BadImages = opt("skip", "an unreadable image: skip it (counted, logged) or stop with an error")
    check_images: bool = opt(True, "decode-check every image while reading the release")
    label_conflicts: LabelConflicts = opt("error", "one picture filed with two labels: stop with the list, or train it "
                                                   "unlabelled (contrastive losses only), counted and logged")

    def working_side(self, image_size: int) -> int:
        """The decoded cache's side: room for the random resized crop around the model's input."""
        return self.working_size or int(round(image_size * 1.15))


@dataclass
class CVConfig:
    n_splits: int = opt(5, "folds of the grouped, stratified cross-validation")
    seed: int = opt(42, "seed of the fold assignment")
    near_dup: bool = opt(True, "join near-duplicate frames (shifted, rotated, rescaled, re-encoded, re-exposed copies; "
                               "consecutive video frames) into one fold group, found by content")
    near_dup_threshold: float = opt(0.8, "aligned correlation (0-1, best over shift, rotation and scale of the "
                                         "band-passed central half) from which two frames are near-duplicates")
    folds_from: str = opt("", "take the folds of another run (runs/NAME or a folds.csv) instead of making them; "
                              "runs with the same data and cv settings get the same folds without it")


@dataclass
class LoraConfig:
    enabled: bool = opt(True, "peft LoRA adapters on the towers (false: train_last_blocks instead)")
    rank: int = opt(16, "LoRA rank")
    alpha: int = opt(32, "LoRA alpha (the adapter is scaled by alpha / rank)")
    dropout: float = opt(0.0, "peft lora_dropout; module targets only (a parameter target has no input to drop)")
    text: bool = opt(True, "also adapt the text tower")
    targets: list[str] = opt(help="auto: the tower family's preset (open_clip ViT: attn.in_proj_weight, mlp.c_fc, "
                                  "mlp.c_proj); or names inside a block: modules, or parameters ending in _weight",
                             factory=lambda: ["auto"])
    train_last_blocks: int = opt(0, "without LoRA: unfreeze the last N vision blocks and the tower's head "
                                    "(the ablation baseline); -1: the whole vision tower (full fine-tuning)")


@dataclass
class FusionConfig:
    enabled: bool = opt(True, "multi-level CLS fusion (off: CLIP's own image embedding)")
    mode: FusionMode = opt("softmax", "softmax-weighted sum of the levels, or their concatenation")
    layers: list[int] = opt(help="vision blocks whose CLS token is fused (negative = from the end)",
                            factory=lambda: [-4, -3, -2, -1])
    final_logit: float = opt(4.0, "initial logit of the last level: weight 0.95 at 4 (8 saturates the softmax)")


@dataclass
class SlerpConfig:
    train: bool = opt(True, "an extra view of each labelled image slerped toward its class prompt")
    t_max: float = opt(0.3, "largest slerp step of that view")
    infer: bool = opt(True, "prompt-guided retrieval embedding at inference")
    alpha: float = opt(0.2, "slerp alpha at inference; re-tuned per track on OOF at the end of training")
    alpha_grid: list[float] = opt(help="alphas tried when tuning", factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.5])


@dataclass
class ModelConfig:
    name: str = opt("ViT-B-16-quickgelu", "open_clip model name (a name with quickgelu forces QuickGELU), or "
                                          "timm:<timm model name> for an image-only member (cls and i2i, no t2i)")
    pretrained: str = opt("openai", "open_clip tag, a weights file, local-dir:/folder, or empty for random weights")
    offline: bool = opt(False, "HF_HUB_OFFLINE=1: fail at once instead of reaching a hub")
    image_size: int = opt(0, "input side in px; 0 = the model's own (a ViT above it gets resampled position "
                             "embeddings)")
    tokenizer: str = opt("", "empty: open_clip's tokenizer of the model; local-dir:/folder: Hugging Face tokenizer "
                             "files (tokenizer.json ...) for a model whose tokenizer lives on the hub")
    prompts: bool = opt(True, "class-prompt logits and prompt-guided retrieval")
    lora: LoraConfig = opt(help="LoRA adapters", factory=LoraConfig)
    fusion: FusionConfig = opt(help="multi-level CLS fusion", factory=FusionConfig)
    slerp: SlerpConfig = opt(help="spherical interpolation toward class prompts", factory=SlerpConfig)


@dataclass
class LossConfig:
    ce: float = opt(1.0, "weight of the head's cross-entropy")
    prompt: float = opt(1.0, "lambda_p: cross-entropy of the class-prompt logits")
    text: float = opt(1.0, "lambda_t: multi-positive image-text InfoNCE")
    image: float = opt(0.5, "lambda_i: supervised contrastive loss between images")
    contrastive: Contrastive = opt("auto", "image-text loss: softmax (CLIP's InfoNCE), sigmoid (SigLIP's, with a "
                                           "learned logit_bias), auto: sigmoid where the base has a logit_bias")
    label_smoothing: float = opt(0.1, "label smoothing of both cross-entropies")
    class_weights: bool = opt(False, "inverse-frequency class weights in the cross-entropies")


@dataclass
class TrainConfig:
    folds: list[int] = opt(help="folds this call trains; [] = every fold, [-1] = one model on all data",
                           factory=list)
    epochs: int = opt(10, "epochs per fold; the last one is kept")
    batch_size: int = opt(32, "images per step and process")
    eval_batch_size: int = opt(64, "images per embedding batch")
    lr_lora: float = opt(1e-4, "learning rate of the adapters (or unfrozen blocks)")
    lr_head: float = opt(1e-3, "learning rate of fusion, head and logit_scale")
    weight_decay: float = opt(0.05, "AdamW weight decay on matrices (none on biases, norms, scales)")
    warmup_frac: float = opt(0.1, "share of the steps spent in linear warmup before the cosine decay")
    grad_accum: int = opt(1, "gradient accumulation steps")
    max_grad_norm: float = opt(1.0, "gradient clipping norm; 0 = none")
    grad_checkpointing: bool = opt(False, "recompute block activations in backward (open_clip set_grad_checkpointing)")
    mixed_precision: Precision = opt("auto", "auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU")
    hflip: bool = opt(True, "laterality-aware flip (swaps labels and the words left/right)")
    resume: bool = opt(False, "skip the folds that finished earlier")
    parallel: Parallel = opt("ddp", "under accelerate launch --num_processes N: ddp (every fold over the N processes, "
                                    "gradients synced), folds (each process trains whole folds alone on its own "
                                    "device, dealt round-robin; one report), auto (folds when N is no more than the "
                                    "folds to train, else ddp)")
    monitor_metric: Monitor = opt("f1_macro", "held-out score logged per epoch to watch a run; never picks an epoch")
    monitor_every: int = opt(1, "embed the held-out fold for monitor_metric every N epochs and after the last; "
                                "0 = after the last only (a fold is seconds of GPU work: the score costs more)")
    seed: int = opt(42, "training seed (each fold adds its index)")
    log_with: list[Tracker] = opt(help="Accelerate trackers, e.g. [tensorboard]; [] = off", factory=list)
    ema_decay: float = opt(0.0, "EMA of the trainable weights (with warm-up), used for held-out evaluation and "
                                "saved as the fold's weights; 0 = off (e.g. 0.999)")
    ema_warmup: EmaWarmup = opt("debiased", "the EMA's early decays: debiased (Adam's bias correction: the decay "
                                            "means what it says from the first step), timm (ModelEmaV3: "
                                            "1 - t^(-2/3)), tf (min(decay, (1+t)/(10+t)), before this option)")
    mixup_alpha: float = opt(0.0, "mixup of labelled images (soft targets on the cross-entropies); 0 = off")
    cutmix_alpha: float = opt(0.0, "cutmix of labelled images (soft targets on the cross-entropies); 0 = off")
    mix_prob: float = opt(1.0, "share of labelled images mixed when mixup or cutmix is on")
    layer_decay: float = opt(1.0, "learning rate x decay^(depth from the top) per block of each tower (LoRA "
                                  "adapters or unfrozen blocks); 1.0 = off (e.g. 0.8)")
    pseudo_from: str = opt("", "a finished run with the same folds: fold k adds the test images its fold-k model "
                               "labels with confidence >= pseudo_threshold to fold k's training data")
    pseudo_data: str = opt("", "the unlabelled test folder the pseudo-labels are taken from")
    pseudo_threshold: float = opt(0.9, "the least class probability a pseudo-label needs")


@dataclass
class InferConfig:
    tta_flip: bool = opt(True, "average with a flipped view (left/right classes swapped)")
    topk: int = opt(10, "ranked answers kept per retrieval query")
    gallery: str = opt("", "file listing the gallery images, one per line; empty = the images of each query "
                           "list's own folder (else every test image)")
    partial: Partial = opt("refuse", "a run with unfinished folds: refuse, or use the finished ones")
    head_weight: float = opt(-1.0, "head vs prompt probabilities; -1 = the OOF-tuned value")
    merge_lora: bool = opt(False, "fold each adapter into the base while embedding (faster, ~1e-7 off)")
    max_sim_bytes: int = opt(MAX_SIM_BYTES, "bound on every similarity block while ranking and re-ranking")
    search: Search = opt("torch", "torch (exact, chunked) or faiss-flat (exact), faiss-ivf, faiss-hnsw")
    faiss_nprobe: int = opt(16, "inverted lists probed by faiss-ivf")
    wise_grid: list[float] = opt(help="WiSE-FT: scales of the fine-tuning (LoRA delta, or fully fine-tuned backbone "
                                      "tensors interpolated with the base; 0 = zero-shot, 1 = as trained) embedded out "
                                      "of fold and tuned per part (cls, i2i, t2i) by cross-fitting; [1.0] = off",
                                 factory=lambda: [1.0])
    memory_weight: list[float] = opt(help="known-pair memory for t2i: weights w of the mean embedding of the training "
                                          "images carrying a query caption, mixed into its query (normalised "
                                          "(1-w) text + w memory), tuned on OOF by cross-fitting; [0.0] = off",
                                     factory=lambda: [0.0])


@dataclass
class RerankConfig:
    methods: list[RerankMethod] = opt(help="re-ranking methods tried on OOF, in order (per track, where meaningful)",
                                      factory=lambda: list(RERANK_METHODS))
    tune: bool = opt(True, "keep a method only where it raises the track's OOF MRR by min_gain")
    min_gain: float = opt(0.002, "MRR gain a method must bring to be kept")
    dba_k: int = opt(2, "database-side augmentation: neighbours averaged")
    qe_k: int = opt(2, "alpha query expansion: neighbours averaged")
    qe_alpha: float = opt(3.0, "alpha query expansion: similarity exponent")
    class_beta: float = opt(0.1, "class-consistency bonus weight")
    k1: int = opt(20, "k-reciprocal: neighbourhood size")
    k2: int = opt(6, "k-reciprocal: local query expansion size")
    lam: float = opt(0.3, "k-reciprocal: weight of the original distance")


@dataclass
class SpeedConfig:
    """Where the input pipeline runs and which compute paths are used; each option measured in bench/."""
    augment_on: AugmentOn = opt("auto", "batch augmentation on the device (auto: on a GPU) or in the loader")
    channels_last: bool = opt(False, "NHWC images and weights (in a ViT only the patch embedding is a conv)")
    compile: bool = opt(False, "torch.compile through Accelerate's TorchDynamoPlugin (inductor)")
    compile_mode: CompileMode = opt("default", "torch.compile mode")
    sdpa: Sdpa = opt("auto", "pin torch's attention kernel in the vision tower")


@dataclass
class AblationConfig:
    base: list[str] = opt(help="overrides that switch everything off (empty: the method's ladder)", factory=list)
    rungs: dict[str, list[str]] = opt(help="rung name -> overrides switched on there, cumulative", factory=dict)


@dataclass
class Config:
    name: str = opt("run", "run name: the run directory is output_dir/name")
    output_dir: str = opt("runs", "folder of the run directories (and of the shared image cache)")
    labels: LabelsConfig = opt(help="the label set", factory=LabelsConfig)
    data: DataConfig = opt(help="the training release and its decoded-image cache", factory=DataConfig)
    cv: CVConfig = opt(help="cross-validation folds", factory=CVConfig)
    model: ModelConfig = opt(help="backbone, weights and the kit's modules", factory=ModelConfig)
    loss: LossConfig = opt(help="weights of the joint objective", factory=LossConfig)
    train: TrainConfig = opt(help="optimisation", factory=TrainConfig)
    infer: InferConfig = opt(help="fold ensembling and ranking", factory=InferConfig)
    rerank: RerankConfig = opt(help="retrieval re-ranking, chosen on OOF", factory=RerankConfig)
    speed: SpeedConfig = opt(help="compute paths (see bench/)", factory=SpeedConfig)
    ablation: AblationConfig = opt(help="the ablation ladder", factory=AblationConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def image_cache_dir(self) -> Path:
        """Shared by every run under output_dir: entries are keyed by file content, so runs can share."""
        return Path(self.data.cache_dir) if self.data.cache_dir else Path(self.output_dir) / ".image_cache"


def _keys(cls, prefix="") -> list[str]:
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        out.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            out += _keys(tp, prefix + name + ".")
    return out


def _cast(value, tp, key: str):
    """Cast a YAML-parsed value to a field's annotated type; errors name the key."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}' = {value!r}; choose one of {list(choices)}")
        return value
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no", "on", "off"}:
                return value.lower() in {"true", "1", "yes", "on"}
            raise TypeError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            if not math.isfinite(x := float(value)):  # every range check would pass NaN: refused for every key
                raise ConfigError(f"config key '{key}' = {value!r}; must be a finite number")
            return x
        if tp is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return "" if value is None else str(value)
        if origin is list:
            (item,) = typing.get_args(tp)
            if not isinstance(value, list):
                value = [value]
            return [_cast(v, item, key) for v in value]
        if origin is dict:
            kt, vt = typing.get_args(tp)
            if not isinstance(value, dict):
                raise TypeError
            return {_cast(k, kt, key): _cast(v, vt, key) for k, v in value.items()}
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}': expected {getattr(tp, '__name__', tp)}, got {value!r}") from None
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _keys(Config), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


# keys of older versions: ignored (with a log line) so that older runs' config.yaml still load
REMOVED = {"train.log_every": "every epoch logs one line",
           "cv.near_dup_bits": "pHash bits gave way to cv.near_dup and cv.near_dup_threshold (aligned correlation)"}


def _apply(obj, data: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for k, v in data.items():
        key = prefix + str(k)
        if key in REMOVED:
            logging.getLogger("entrep.config").info("config key '%s' is no longer used (%s); ignored", key,
                                                    REMOVED[key])
            continue
        if k not in hints:
            raise _unknown(key)
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}' is a section; give its fields, e.g. {key}.<field>=...")
            _apply(getattr(obj, k), v, key + ".")
        else:
            setattr(obj, k, _cast(v, tp, key))


def parse_override(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _plain(value):
    """A Python value as YAML can carry it: paths and other objects as their str(), tuples and sets as
    lists, numpy scalars as numbers."""
    import os

    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in (sorted(value, key=str) if isinstance(value, (set, frozenset)) else value)]
    if hasattr(value, "item") and callable(value.item):  # numpy and torch scalars
        with contextlib.suppress(TypeError, ValueError):
            return _plain(value.item())
    return str(value)


def override_item(key: str, value) -> str:
    """A keyword override (`predict(run, test, infer__gallery=Path(...))`) as the `key=value` string the
    command line would give: a str as it is (as typed on a command line); any other value (a Path, a
    number, a bool, a list) as YAML that parses back to that value."""
    if isinstance(value, str):
        return f"{key}={value}"
    text = yaml.safe_dump(_plain(value), default_flow_style=True, allow_unicode=True, width=1 << 30)
    return f"{key}={text.strip().removesuffix('...').strip()}"


def _nest(key: str, value) -> dict:
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = _yaml(path.read_bytes().decode("utf-8-sig")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
        except (yaml.YAMLError, RecursionError) as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None  # one line
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config sections")
        _apply(cfg, data)
    for item in overrides:
        key, value = parse_override(item)
        _apply(cfg, _nest(key, value))
    expand_paths(cfg)
    validate(cfg)
    return cfg


# keys that name a file or folder (model.pretrained and model.tokenizer: when they are one, after local-dir:)
PATH_KEYS = ("output_dir", "data.root", "data.cache_dir", "cv.folds_from", "model.pretrained", "model.tokenizer",
             "train.pseudo_from", "train.pseudo_data", "infer.gallery")


def expand_paths(cfg: Config) -> None:
    """`~` and environment variables in every path key, as a shell would expand them: `output_dir: ~/x`
    wrote to a literal ./~/x. A variable that is not set is refused in one line naming the key."""
    import os

    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        obj = cfg
        for part in parents:
            obj = getattr(obj, part)
        value = getattr(obj, leaf)
        prefix = "local-dir:" if value.startswith("local-dir:") else ""
        path = value[len(prefix):]
        if not path.startswith(("~", "$")) and "${" not in path and "/$" not in path:
            continue  # an open_clip tag or a plain path: as it is
        done = os.path.expandvars(os.path.expanduser(path))
        if "$" in done:
            raise ConfigError(f"config key '{key}' = {value!r}: names an environment variable that is not set")
        setattr(obj, leaf, prefix + done)


def validate(cfg: Config) -> None:
    if cfg.cv.n_splits < 2:
        raise ConfigError(f"cv.n_splits = {cfg.cv.n_splits}; need at least 2 folds")
    bad = [f for f in cfg.train.folds if f != -1 and not 0 <= f < cfg.cv.n_splits]
    if bad:
        raise ConfigError(f"train.folds {bad} outside 0..{cfg.cv.n_splits - 1} (or -1 for all data)")
    if not 0 <= cfg.model.slerp.t_max <= 1 or not 0 <= cfg.model.slerp.alpha <= 1:
        raise ConfigError("model.slerp.t_max and model.slerp.alpha must lie in [0, 1]")
    for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum"):
        if getattr(cfg.train, name) < 1:
            raise ConfigError(f"config key 'train.{name}' must be >= 1")
    _validate_ranges(cfg)
    _validate_lora(cfg.model.lora)
    if bool(cfg.train.pseudo_from) != bool(cfg.train.pseudo_data):
        raise ConfigError("train.pseudo_from and train.pseudo_data go together: the run whose fold models label, and "
                          "the unlabelled test folder they label")
    if not cfg.model.fusion.layers:
        raise ConfigError("model.fusion.layers is empty")
    from entrep.labels import LabelSet

    try:
        LabelSet.from_config(cfg.labels)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# key -> (low, high, what): the ranges every numeric field must lie in; None = unbounded on that side
RANGES = {
    "data.working_size": (0, None, "0 (1.15 x the model's input) or a side in px"),
    "model.image_size": (0, 4096, "0 (the model's own input side) or a side in px"),
    "model.lora.train_last_blocks": (-1, None, "-1 (the whole vision tower), 0 or a number of blocks"),
    "data.num_workers": (0, None, "0 (the main process) or more loader workers"),
    "cv.near_dup_threshold": (0.5, 1.0, "a correlation in [0.5, 1] (cv.near_dup=false turns the pass off)"),
    "train.lr_lora": (1e-12, None, "a positive learning rate"), "train.lr_head": (1e-12, None, "a positive learning rate"),
    "train.weight_decay": (0, None, ">= 0"), "train.warmup_frac": (0, 0.999, "a fraction in [0, 1)"),
    "train.max_grad_norm": (0, None, ">= 0 (0 = no clipping)"),
    "train.monitor_every": (0, None, "0 (after the last epoch only) or every N epochs"),
    "train.ema_decay": (0, 0.99999, "0 (off) or a decay in (0, 1), e.g. 0.999"),
    "train.mixup_alpha": (0, None, ">= 0 (0 = off)"), "train.cutmix_alpha": (0, None, ">= 0 (0 = off)"),
    "train.mix_prob": (0, 1, "a share in [0, 1]"), "train.layer_decay": (0.01, 1, "a factor in (0, 1]; 1 = off"),
    "train.pseudo_threshold": (0, 1, "a probability in [0, 1]"),
    "loss.ce": (0, None, ">= 0"), "loss.prompt": (0, None, ">= 0"), "loss.text": (0, None, ">= 0"),
    "loss.image": (0, None, ">= 0"), "loss.label_smoothing": (0, 0.999, "a fraction in [0, 1)"),
    "infer.topk": (1, None, ">= 1 (the challenge takes 1; ranked lists more)"),
    "infer.head_weight": (-1, 1, "-1 (the OOF-tuned value) or a weight in [0, 1]"),
    "infer.max_sim_bytes": (2**20, None, "at least 1 MiB (1048576)"), "infer.faiss_nprobe": (1, None, ">= 1"),
    "rerank.min_gain": (0, None, ">= 0"), "rerank.dba_k": (1, None, ">= 1"), "rerank.qe_k": (1, None, ">= 1"),
    # similarities are cosines in [-1, 1]: past 100 the exponent or the bonus decides every ranking alone (and
    # 1e308 overflowed in float32)
    "rerank.qe_alpha": (0, 100, "in [0, 100]"), "rerank.class_beta": (0, 100, "in [0, 100]"), "rerank.k1": (1, None, ">= 1"),
    "rerank.k2": (1, None, ">= 1"), "rerank.lam": (0, 1, "a weight in [0, 1]"),
}


def _validate_ranges(cfg: Config) -> None:
    for key, (lo, hi, what) in RANGES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"config key '{key}' = {value!r}; must be {what}")
    if cfg.infer.head_weight < 0 and cfg.infer.head_weight != -1:
        raise ConfigError(f"config key 'infer.head_weight' = {cfg.infer.head_weight!r}; must be -1 (the OOF-tuned "
                          f"value) or a weight in [0, 1]")
    validate_run_name(cfg.name)
    for key, grid in (("infer.wise_grid", cfg.infer.wise_grid), ("infer.memory_weight", cfg.infer.memory_weight)):
        if not grid or any(not 0 <= v <= 1 for v in grid):
            raise ConfigError(f"config key '{key}' = {grid}: a non-empty list of values in [0, 1]")
    if not cfg.model.slerp.alpha_grid:  # empty, it failed after every fold had trained
        raise ConfigError("config key 'model.slerp.alpha_grid' = []: a non-empty list of alphas in [0, 1] (e.g. [0.0])")
    if any(a < 0 or a > 1 for a in cfg.model.slerp.alpha_grid):
        raise ConfigError(f"model.slerp.alpha_grid {cfg.model.slerp.alpha_grid}: every alpha must lie in [0, 1]")
    losses = {k: getattr(cfg.loss, k) for k in LOSS_WEIGHTS}
    if not any(losses.values()):  # a loss of constant zero has no gradient: a traceback at the first step
        raise ConfigError(f"every loss weight is 0 ({', '.join(f'loss.{k}' for k in losses)}): nothing would train; "
                          f"give one a weight, e.g. loss.ce=1")


LOSS_WEIGHTS = ("ce", "prompt", "text", "image")  # the joint loss's terms (docs/method.md)


def validate_run_name(name: str) -> None:
    if not name or name in (".", "..") or any(c in name for c in "/\\") or name.startswith("~"):
        raise ConfigError(f"run name {name!r} must be a plain folder name under output_dir (no '/', '..' or "
                          f"absolute path); put the folder elsewhere with output_dir=DIR")


def is_param_target(target: str) -> bool:
    """LoRA targets ending in `_weight`/`.weight` name parameters (peft target_parameters); the rest modules."""
    return target.endswith(("_weight", ".weight"))


def _validate_lora(lora: LoraConfig) -> None:
    """What peft would refuse at build time, refused here with the key and the fix."""
    if not lora.enabled:
        return
    if lora.rank < 1:
        raise ConfigError(f"model.lora.rank = {lora.rank}; a LoRA rank must be >= 1 (or model.lora.enabled=false)")
    if lora.alpha <= 0:
        raise ConfigError(f"model.lora.alpha = {lora.alpha}; must be > 0 (the adapter is scaled by alpha / rank)")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout = {lora.dropout}; must lie in [0, 1)")
    if not lora.targets:
        raise ConfigError("model.lora.targets is empty; auto (the tower family's preset) or e.g. "
                          "[attn.in_proj_weight, mlp.c_fc, mlp.c_proj]")
    if "auto" in lora.targets and lora.targets != ["auto"]:
        raise ConfigError(f"model.lora.targets {lora.targets}: 'auto' (the family's preset) stands alone")
    # peft's ParamWrapper (target_parameters) adds B @ A to the weight itself, so there is no input to drop out.
    param_targets = [t for t in lora.targets if is_param_target(t)]
    if lora.dropout and param_targets:
        raise ConfigError(f"model.lora.dropout = {lora.dropout} cannot apply to the parameter target(s) "
                          f"{param_targets} (peft adapts the weight, not an input); set model.lora.dropout=0, or "
                          f"target modules only, e.g. model.lora.targets=[attn,mlp.c_fc,mlp.c_proj]")


# Keys that change only how finished folds are scored and ensembled, never what is trained
# (prefixes end with "."); the ablation re-scores a rung that changes nothing else.
SCORING_KEYS = ("infer.", "rerank.", "model.slerp.infer", "model.slerp.alpha", "model.slerp.alpha_grid")
# Keys that steer one invocation (or only inference, or where the files are) and may differ between
# the train.py calls of one run; every other key defines the run and must stay as first written.
INVOCATION_KEYS = ("name", "output_dir", "data.root", "data.num_workers", "data.cache_dir", "data.check_images",
                   "train.folds", "train.resume", "train.parallel", "train.grad_accum", "train.eval_batch_size",
                   "train.monitor_metric", "train.monitor_every", "train.log_with", "speed.", "ablation.",
                   *SCORING_KEYS)
# Keys that may differ between the processes of one launch: where each machine keeps its files.
PER_MACHINE_KEYS = ("output_dir", "data.root", "data.cache_dir", "data.num_workers")


def in_keys(key: str, patterns) -> bool:
    """The one rule every key list above is read by: a pattern ending in "." is a section (every key
    under it), any other names one key exactly ("model.slerp.alpha" is not "model.slerp.alpha_grid")."""
    return any(key.startswith(p) if p.endswith(".") else key == p for p in patterns)


def shown_keys(patterns) -> str:
    """A key list as a message names it: sections as `infer.*`."""
    return ", ".join(f"{p}*" if p.endswith(".") else p for p in patterns)


def flat_dict(d: dict, prefix: str = "") -> dict:
    """{'a.b.c': value} from nested sections; label prompts and ablation rungs stay whole."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("prompts", "rungs"):
            out |= flat_dict(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out


def run_defining_diff(on_disk: Config, now: Config) -> list[str]:
    """The run-defining keys whose values differ."""
    a, b = flat_dict(to_dict(on_disk)), flat_dict(to_dict(now))
    return sorted(k for k in a.keys() | b.keys() if not in_keys(k, INVOCATION_KEYS) and a.get(k) != b.get(k))


def recipe_switches(cfg: Config) -> dict[str, str]:
    """The method's components and the recipe's switches (docs/method.md, docs/recipe.md), each on or off
    with its value: what start-up logs, the report page shows and the runs table compares."""
    m, t, i = cfg.model, cfg.train, cfg.infer
    lora = f"rank {m.lora.rank}" if m.lora.enabled else (f"off: last {m.lora.train_last_blocks} blocks"
                                                          if m.lora.train_last_blocks else "off")
    mixing = (f"mixup {t.mixup_alpha:g}, cutmix {t.cutmix_alpha:g}, p {t.mix_prob:g}"
              if t.mixup_alpha or t.cutmix_alpha else "off")
    return {
        "model": m.name, "lora": lora, "fusion": "on" if m.fusion.enabled else "off",
        "prompts": "on" if m.prompts else "off",
        "slerp": ", ".join(w for w, on in (("train", m.slerp.train), ("retrieval", m.slerp.infer)) if on) or "off",
        "loss": f"ce {cfg.loss.ce:g}, prompt {cfg.loss.prompt:g}, text {cfg.loss.text:g}, image {cfg.loss.image:g}",
        "flip_tta": "on" if i.tta_flip else "off",
        "rerank": ", ".join(cfg.rerank.methods) or "off",
        "ema": f"{t.ema_decay:g} ({t.ema_warmup})" if t.ema_decay else "off",
        "mixup_cutmix": mixing,
        "layer_decay": f"{t.layer_decay:g}" if t.layer_decay != 1 else "off",
        "image_size": f"{m.image_size} px" if m.image_size else "the model's own",
        "wise_ft": f"{i.wise_grid}" if list(i.wise_grid) != [1.0] else "off",
        "memory": f"{i.memory_weight}" if list(i.memory_weight) != [0.0] else "off",
        "pseudo_labels": f"from {t.pseudo_from} (>= {t.pseudo_threshold:g})" if t.pseudo_from else "off",
        "epochs": str(t.epochs), "seed": str(t.seed),
    }


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def describe(obj, indent: str = "") -> str:
    """The config as YAML with each field's help as a comment: `train.py --print-config`, loadable
    again as a --config file."""
    lines = []
    for f in dataclasses.fields(obj):
        value, help_ = getattr(obj, f.name), f.metadata.get("help", "")
        if dataclasses.is_dataclass(value):
            lines += [f"{indent}# {help_}", f"{indent}{f.name}:", describe(value, indent + "  ")]
        else:  # JSON is YAML: one line per field, whatever its type
            lines.append(f"{indent}{f.name}: {json.dumps(value, ensure_ascii=False)}  # {help_}")
    return "\n".join(lines)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
