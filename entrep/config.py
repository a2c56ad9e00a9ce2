"""Dataclass config: YAML file + dotted `key=value` overrides, validated, dumped to the run dir."""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from entrep.io import atomic_write_text
from entrep.errors import EntrepError
from entrep.labels import ENTREP_CLASSES, ENTREP_PROMPTS, ENTREP_SWAP


class ConfigError(EntrepError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans (true/false only): YAML 1.1 reads no/off/yes/on as booleans too, which
    made `train.mixed_precision=no` the string 'False'. Boolean fields still accept yes/no."""


_Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:bool"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


@dataclass
class LabelsConfig:
    names: list[str] = field(default_factory=lambda: list(ENTREP_CLASSES))  # index = position
    prompts: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in ENTREP_PROMPTS.items()})
    swap: list[list[str]] = field(default_factory=lambda: [list(p) for p in ENTREP_SWAP])


@dataclass
class DataConfig:
    root: str = "data/entrep"          # training release folder (--data overrides)
    working_size: int = 0              # decoded-cache side in px; 0 = 1.15 x model image size
    cache_dir: str = ""                # decoded-image cache; "" = <output_dir>/.image_cache
    num_workers: int = 0
    bad_images: str = "skip"           # skip (counted, logged) | error
    check_images: bool = True          # decode-check every image while building the table

    def working_side(self, image_size: int) -> int:
        """The decoded cache's side: room for the random resized crop around the model's input."""
        return self.working_size or int(round(image_size * 1.15))


@dataclass
class CVConfig:
    n_splits: int = 5
    seed: int = 42
    near_dup_bits: int = 12            # pHash (256-bit) distance that makes two images one fold group; 0 = off


@dataclass
class LoraConfig:
    enabled: bool = True
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0               # module targets only: peft has no dropout path for parameter targets
    text: bool = True                  # also adapt the text tower
    targets: list[str] = field(default_factory=lambda: ["attn.in_proj_weight", "mlp.c_fc", "mlp.c_proj"])
    train_last_blocks: int = 0         # without LoRA: unfreeze the last N vision blocks (ablation baseline)


@dataclass
class FusionConfig:
    enabled: bool = True
    mode: str = "softmax"              # softmax | concat
    layers: list[int] = field(default_factory=lambda: [-4, -3, -2, -1])
    final_logit: float = 4.0           # last level starts at weight 0.95 of 4 (8 saturates the softmax)


@dataclass
class SlerpConfig:
    train: bool = True                 # extra view toward the own class prompt
    t_max: float = 0.3
    infer: bool = True                 # prompt-guided retrieval embedding
    alpha: float = 0.2                 # default; re-tuned on OOF at the end of training
    alpha_grid: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.5])


@dataclass
class ModelConfig:
    name: str = "ViT-B-16-quickgelu"
    pretrained: str = "openai"         # open_clip tag | /path/file.safetensors|.bin|.pt | local-dir:/folder | "" (random)
    offline: bool = False              # HF_HUB_OFFLINE=1: fail fast instead of reaching a hub
    prompts: bool = True               # class-prompt logits + prompt-guided retrieval
    lora: LoraConfig = field(default_factory=LoraConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    slerp: SlerpConfig = field(default_factory=SlerpConfig)


@dataclass
class LossConfig:
    ce: float = 1.0
    prompt: float = 1.0                # lambda_p
    text: float = 1.0                  # lambda_t
    image: float = 0.5                 # lambda_i
    label_smoothing: float = 0.1
    class_weights: bool = False        # inverse-frequency CE weights


@dataclass
class TrainConfig:
    folds: list[int] = field(default_factory=list)  # [] = every fold; [-1] = one model on all data
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int = 64
    lr_lora: float = 1e-4
    lr_head: float = 1e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    grad_checkpointing: bool = False   # recompute block activations in backward (open_clip's set_grad_checkpointing)
    mixed_precision: str = "auto"      # auto | no | fp16 | bf16
    hflip: bool = True                 # laterality-aware flip (swaps labels and left/right words)
    resume: bool = False
    monitor_metric: str = "f1_macro"   # held-out score logged per epoch to watch a run; never picks an epoch
    seed: int = 42
    log_every: int = 10
    log_with: list[str] = field(default_factory=list)  # Accelerate trackers: tensorboard, wandb, mlflow, ... ([] = off)


@dataclass
class InferConfig:
    tta_flip: bool = True
    topk: int = 10
    gallery: str = ""                  # optional file listing the gallery images (one per line)
    partial: str = "refuse"            # refuse | use: a run with unfinished folds
    head_weight: float = -1.0          # -1 = the OOF-tuned value stored in the run
    merge_lora: bool = False           # fold each adapter into the base while embedding (faster, ~1e-7 off)
    max_sim_bytes: int = 256 * 2**20   # bound on one similarity block during ranking
    search: str = "torch"              # torch (exact, chunked) | faiss-flat (exact) | faiss-ivf | faiss-hnsw
    faiss_nprobe: int = 16             # inverted lists probed by faiss-ivf


@dataclass
class RerankConfig:
    methods: list[str] = field(default_factory=lambda: ["dba", "qe", "class_bonus", "kreciprocal"])
    tune: bool = True                  # keep a method only where it raises mean OOF MRR by min_gain
    min_gain: float = 0.002
    dba_k: int = 2
    qe_k: int = 2
    qe_alpha: float = 3.0
    class_beta: float = 0.1
    k1: int = 20
    k2: int = 6
    lam: float = 0.3


@dataclass
class SpeedConfig:
    """Where the input pipeline runs and which compute paths are used; each option measured in bench/."""
    augment_on: str = "auto"           # auto (device on a GPU, loader on CPU) | device | loader
    channels_last: bool = False        # NHWC images + weights (in a ViT only the patch embedding is a conv)
    compile: bool = False              # torch.compile through Accelerate's TorchDynamoPlugin (inductor)
    compile_mode: str = "default"      # default | reduce-overhead | max-autotune
    sdpa: str = "auto"                 # auto | math | flash | efficient | cudnn: pin torch's attention kernel


@dataclass
class AblationConfig:
    # rung name -> overrides switched on at that rung (cumulative, applied on top of `base`).
    # Empty: the method's ladder (entrep/ablate.py), built from this config's own values.
    base: list[str] = field(default_factory=list)
    rungs: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs"
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def image_cache_dir(self) -> Path:
        """Shared by every run under output_dir: entries are keyed by file content, so runs can share."""
        return Path(self.data.cache_dir) if self.data.cache_dir else Path(self.output_dir) / ".image_cache"


TRACKERS = {"tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "trackio", "swanlab", "all"}

CHOICES = {
    "data.bad_images": {"skip", "error"},
    "model.fusion.mode": {"softmax", "concat"},
    "train.mixed_precision": {"auto", "no", "fp16", "bf16"},
    "train.monitor_metric": {"f1_macro", "accuracy", "f1_weighted", "none"},
    "infer.partial": {"refuse", "use"},
    "infer.search": {"torch", "faiss-flat", "faiss-ivf", "faiss-hnsw"},
    "speed.augment_on": {"auto", "device", "loader"},
    "speed.compile_mode": {"default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"},
    "speed.sdpa": {"auto", "math", "flash", "efficient", "cudnn"},
}


def _keys(cls, prefix="") -> list[str]:
    out = []
    for name, tp in _hints(cls).items():
        out.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            out += _keys(tp, prefix + name + ".")
    return out


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _cast(value, tp, key: str):
    """Cast a YAML-parsed value to a field's annotated type; errors name the key."""
    origin = typing.get_origin(tp)
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
            return float(value)
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
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}': expected {getattr(tp, '__name__', tp)}, got {value!r}") from None
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _keys(Config), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _apply(obj, data: dict, prefix: str = "") -> None:
    hints = _hints(type(obj))
    for k, v in data.items():
        key = prefix + str(k)
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
        raise ConfigError(f"override '{item}' is not key=value")
    key, raw = item.split("=", 1)
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


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
            data = _yaml(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config sections")
        _apply(cfg, data)
    for item in overrides:
        key, value = parse_override(item)
        _apply(cfg, _nest(key, value))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' = {value!r}; choose one of {sorted(allowed)}")
    if bad := [t for t in cfg.train.log_with if t not in TRACKERS]:
        raise ConfigError(f"train.log_with {bad}: choose from {sorted(TRACKERS)} (Accelerate's trackers)")
    if not 0 <= cfg.cv.near_dup_bits <= 64:
        raise ConfigError(f"cv.near_dup_bits = {cfg.cv.near_dup_bits}; choose 0 (off) to 64 of the hash's 256 bits")
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
    if any(t.endswith("out_proj") for t in cfg.model.lora.targets):
        raise ConfigError("model.lora.targets: 'out_proj' alone never runs in open_clip's attention (a dead "
                          "adapter); use 'attn.in_proj_weight' or 'attn'")
    from entrep.retrieval import RERANK_METHODS

    if bad := [m for m in cfg.rerank.methods if m not in RERANK_METHODS]:
        raise ConfigError(f"rerank.methods {bad}: choose from {list(RERANK_METHODS)}")
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
    "data.num_workers": (0, None, "0 (the main process) or more loader workers"),
    "train.lr_lora": (1e-12, None, "a positive learning rate"), "train.lr_head": (1e-12, None, "a positive learning rate"),
    "train.weight_decay": (0, None, ">= 0"), "train.warmup_frac": (0, 0.999, "a fraction in [0, 1)"),
    "train.max_grad_norm": (0, None, ">= 0 (0 = no clipping)"),
    "loss.ce": (0, None, ">= 0"), "loss.prompt": (0, None, ">= 0"), "loss.text": (0, None, ">= 0"),
    "loss.image": (0, None, ">= 0"), "loss.label_smoothing": (0, 0.999, "a fraction in [0, 1)"),
    "infer.topk": (1, None, ">= 1 (the challenge takes 1; ranked lists more)"),
    "infer.head_weight": (-1, 1, "-1 (the OOF-tuned value) or a weight in [0, 1]"),
    "infer.max_sim_bytes": (2**20, None, "at least 1 MiB (1048576)"), "infer.faiss_nprobe": (1, None, ">= 1"),
    "rerank.min_gain": (0, None, ">= 0"), "rerank.dba_k": (1, None, ">= 1"), "rerank.qe_k": (1, None, ">= 1"),
    "rerank.qe_alpha": (0, None, ">= 0"), "rerank.class_beta": (0, None, ">= 0"), "rerank.k1": (1, None, ">= 1"),
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
    if not cfg.name or cfg.name in (".", "..") or any(c in cfg.name for c in "/\\") or cfg.name.startswith("~"):
        raise ConfigError(f"run name {cfg.name!r} must be a plain folder name under output_dir (no '/', '..' or "
                          f"absolute path); put the folder elsewhere with output_dir=DIR")
    if any(a < 0 or a > 1 for a in cfg.model.slerp.alpha_grid):
        raise ConfigError(f"model.slerp.alpha_grid {cfg.model.slerp.alpha_grid}: every alpha must lie in [0, 1]")


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
        raise ConfigError("model.lora.targets is empty; e.g. [attn.in_proj_weight, mlp.c_fc, mlp.c_proj]")
    # peft's ParamWrapper (target_parameters) adds B @ A to the weight itself, so there is no input to drop out.
    param_targets = [t for t in lora.targets if is_param_target(t)]
    if lora.dropout and param_targets:
        raise ConfigError(f"model.lora.dropout = {lora.dropout} cannot apply to the parameter target(s) "
                          f"{param_targets} (peft adapts the weight, not an input); set model.lora.dropout=0, or "
                          f"target modules only, e.g. model.lora.targets=[attn,mlp.c_fc,mlp.c_proj]")


# Keys that steer one invocation (or only inference, or where the files are) and may differ between
# the train.py calls of one run; every other key defines the run and must stay as first written.
INVOCATION_KEYS = ("name", "output_dir", "data.root", "data.num_workers", "data.cache_dir", "data.check_images",
                   "train.folds", "train.resume", "train.eval_batch_size", "train.monitor_metric", "train.log_with",
                   "train.log_every", "infer.",
                   "rerank.", "speed.", "ablation.", "model.slerp.infer", "model.slerp.alpha",
                   "model.slerp.alpha_grid")


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
    return sorted(k for k in a.keys() | b.keys()
                  if not (k in INVOCATION_KEYS or k.startswith(tuple(p for p in INVOCATION_KEYS if p.endswith("."))))
                  and a.get(k) != b.get(k))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
