from pathlib import Path

import pytest
import yaml

from entrep.config import ConfigError, load_config, save_config
from entrep.labels import LabelSet


def test_dotted_overrides_cast_to_field_types():
    cfg = load_config(None, ["train.epochs=3", "model.lora.rank=8", "train.folds=[0,2]", "train.hflip=false",
                             "loss.image=1", "model.name=entrep-tiny"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.model.lora.rank == 8
    assert cfg.train.folds == [0, 2]
    assert cfg.train.hflip is False
    assert cfg.loss.image == 1.0 and isinstance(cfg.loss.image, float)


def test_yaml_1_1_words_stay_strings_for_string_fields(tmp_path):
    """`no` is a choice of train.mixed_precision, not the boolean False (YAML 1.1 would make it 'False')."""
    cfg = load_config(None, ["train.mixed_precision=no", "train.hflip=no", "train.resume=yes", "speed.sdpa=math"])
    assert cfg.train.mixed_precision == "no" and cfg.train.hflip is False and cfg.train.resume is True
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  mixed_precision: no\n  hflip: off\n")
    cfg = load_config(p)
    assert cfg.train.mixed_precision == "no" and cfg.train.hflip is False
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_unknown_key_names_it_and_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.epoch'.*did you mean 'train\.epochs'"):
        load_config(None, ["train.epoch=3"])


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  lora:\n    rnak: 4\n")
    with pytest.raises(ConfigError, match=r"'model\.lora\.rnak'.*'model\.lora\.rank'"):
        load_config(p)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"'train\.epochs': expected int, got 'abc'"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, ["train.batch_size=2.5"])


def test_impossible_values_rejected():
    with pytest.raises(ConfigError, match=r"train\.folds \[7\]"):
        load_config(None, ["train.folds=[7]"])
    with pytest.raises(ConfigError, match="model.fusion.mode"):
        load_config(None, ["model.fusion.mode=mean"])
    with pytest.raises(ConfigError, match="labels.swap"):
        load_config(None, ["labels.swap=[[nose-right, elbow]]"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=2", "name=x"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["epochs"] == 2


def test_another_label_set_needs_no_code(tmp_path):
    p = tmp_path / "digits.yaml"
    names = [str(i) for i in range(10)]
    p.write_text(yaml.safe_dump({"labels": {"names": names, "prompts": {"3": ["a handwritten three"]},
                                            "swap": []}}))
    labels = LabelSet.from_config(load_config(p).labels)
    assert len(labels) == 10 and labels.index("7") == 7
    assert labels.prompts["3"] == ("a handwritten three",) and labels.prompts["0"] == ("an image of 0",)
    assert list(labels.swap_perm) == list(range(10))


def test_entrep_swap_permutation():
    labels = LabelSet.from_config(load_config(None).labels)
    assert [labels.names[i] for i in labels.swap_perm] == [
        "nose-left", "nose-right", "ear-left", "ear-right", "vc-open", "vc-closed", "throat"]


@pytest.mark.parametrize("override, key", [
    ("infer.topk=0", "infer.topk"), ("infer.topk=-3", "infer.topk"), ("data.num_workers=-1", "data.num_workers"),
    ("train.lr_lora=-1", "train.lr_lora"), ("train.warmup_frac=-1", "train.warmup_frac"),
    ("train.warmup_frac=1", "train.warmup_frac"), ("loss.label_smoothing=1.5", "loss.label_smoothing"),
    ("infer.head_weight=-0.5", "infer.head_weight"), ("rerank.lam=2", "rerank.lam"),
    ("infer.max_sim_bytes=10", "infer.max_sim_bytes"), ("cv.near_dup_threshold=1.5", "cv.near_dup_threshold"),
    ("rerank.class_beta=1e308", "rerank.class_beta"), ("rerank.qe_alpha=1e5", "rerank.qe_alpha"),
])
def test_values_outside_their_range_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'|{key}"):
        load_config(None, [override])


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "..", ""])
def test_run_names_cannot_leave_output_dir(name):
    with pytest.raises(ConfigError, match="plain folder name under output_dir"):
        load_config(None, [f"name={name}"])


def test_every_field_carries_its_help():
    import dataclasses

    from entrep.config import Config

    missing = []

    def check(obj, prefix=""):
        for f in dataclasses.fields(obj):
            if not f.metadata.get("help"):
                missing.append(prefix + f.name)
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                check(value, prefix + f.name + ".")

    check(Config())
    assert not missing, missing


def test_print_config_shows_every_key_with_its_help_and_loads_back(tmp_path):
    import subprocess
    import sys

    from entrep.config import to_dict

    root = Path(__file__).parents[1]
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/demo.yaml", "--print-config",
                        "model.lora.rank=8"], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "  rank: 8  # LoRA rank" in r.stdout and "mixed_precision: \"auto\"  # auto: bf16" in r.stdout
    (tmp_path / "printed.yaml").write_text(r.stdout)
    assert to_dict(load_config(tmp_path / "printed.yaml")) == to_dict(load_config(root / "configs/demo.yaml",
                                                                                  ["model.lora.rank=8"]))


def test_load_config_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from entrep.config import load_config; load_config('configs/entrep_vitb16.yaml', "
            "['rerank.methods=[dba]']); print(sorted(m for m in ('torch', 'open_clip', 'accelerate') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_a_removed_key_in_an_older_runs_config_is_ignored_not_refused(tmp_path, caplog):
    import logging

    from entrep.config import REMOVED, save_config

    path = tmp_path / "config.yaml"
    save_config(load_config(None, ["train.epochs=3"]), path)
    path.write_text(path.read_text().replace("train:\n", "train:\n  log_every: 10\n", 1))
    assert "log_every" in path.read_text() and "train.log_every" in REMOVED
    with caplog.at_level(logging.INFO, logger="entrep.config"):
        cfg = load_config(path)
    assert cfg.train.epochs == 3 and "train.log_every" in caplog.text and "ignored" in caplog.text
    with pytest.raises(ConfigError, match="unknown config key 'train.log_evry'"):
        load_config(None, ["train.log_evry=1"])


def _float_keys() -> list[str]:
    """Every config key whose field is a float or a list of floats."""
    import dataclasses
    import typing

    from entrep.config import Config

    out = []

    def walk(cls, prefix=""):
        for name, tp in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{name}.")
            elif tp is float or typing.get_args(tp) == (float,):
                out.append((prefix + name, tp is not float))
    walk(Config)
    return out


@pytest.mark.parametrize("bad", ["nan", ".nan", ".inf", "-.inf", "1e999"])
def test_every_float_key_refuses_a_value_that_is_not_finite(bad):
    """Range checks compare, and NaN passes every comparison: train.ema_decay=nan turned EMA off, and
    infer.head_weight=nan scored nothing. The cast refuses it for every float field, lists included."""
    keys = _float_keys()
    assert len(keys) > 15
    for key, is_list in keys:
        with pytest.raises(ConfigError, match=f"config key '{key}' = .*must be a finite number") as e:
            load_config(None, [f"{key}=[{bad}]" if is_list else f"{key}={bad}"])
        assert "\n" not in str(e.value)


def test_a_key_repeated_in_a_config_file_is_refused_naming_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: a second train: section dropped the first silently."""
    (tmp_path / "c.yaml").write_text("train:\n  lr_lora: 1.0e-3\nmodel:\n  name: entrep-tiny\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML: the key 'train' appears twice in one mapping "
                                          r"\(lines 1 and 5\)") as e:
        load_config(tmp_path / "c.yaml")
    assert "\n" not in str(e.value)
    (tmp_path / "d.yaml").write_text("train:\n  epochs: 2\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="the key 'epochs' appears twice"):
        load_config(tmp_path / "d.yaml")
    (tmp_path / "ok.yaml").write_text("train:\n  epochs: 2\nmodel:\n  lora:\n    rank: 4\n")  # nesting is not repetition
    assert load_config(tmp_path / "ok.yaml").train.epochs == 2
    from entrep.config import _yaml

    # a merge key is no repetition, and a key after it may override what it merged
    assert _yaml("a: &b {x: 1, y: 1}\nc:\n  <<: *b\n  y: 2\n")["c"] == {"x": 1, "y": 2}


def test_every_path_key_expands_home_and_environment_variables(monkeypatch, tmp_path):
    from entrep.config import PATH_KEYS, Config, _keys

    assert set(PATH_KEYS) <= set(_keys(Config))  # each names a real key
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("ENTREP_DATA", "/data/entrep")
    for key in PATH_KEYS:
        cfg = load_config(None, [f"{key}=~/a"] + (["train.pseudo_data=/t"] if key == "train.pseudo_from" else [])
                          + (["train.pseudo_from=/r"] if key == "train.pseudo_data" else []))
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert value == f"{tmp_path}/a", key
    cfg = load_config(None, ["data.root=$ENTREP_DATA/train", "model.pretrained=local-dir:${ENTREP_DATA}/w",
                             "model.name=entrep-tiny"])
    assert cfg.data.root == "/data/entrep/train" and cfg.model.pretrained == "local-dir:/data/entrep/w"
    assert load_config(None, ["model.pretrained=openai"]).model.pretrained == "openai"  # a tag stays a tag
    monkeypatch.delenv("ENTREP_UNSET", raising=False)
    with pytest.raises(ConfigError, match="config key 'data.root' = '\\$ENTREP_UNSET/x': names an environment variable"):
        load_config(None, ["data.root=$ENTREP_UNSET/x"])


def test_an_empty_alpha_grid_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="model.slerp.alpha_grid' = \\[\\]: a non-empty list"):
        load_config(None, ["model.slerp.alpha_grid=[]"])


def test_a_config_that_would_train_nothing_is_refused_before_any_work():
    """Every loss weight 0: the first step was 'element 0 of tensors does not require grad'."""
    with pytest.raises(ConfigError, match=r"every loss weight is 0 \(loss.ce, loss.prompt, loss.text, loss.image\)"):
        load_config(None, ["loss.ce=0", "loss.prompt=0", "loss.text=0", "loss.image=0"])
    load_config(None, ["loss.ce=0", "loss.image=0"])  # the text-side losses alone train a CLIP


def test_every_key_the_config_contract_names_is_a_real_key():
    """The key lists (ranges, scoring, invocation, per-machine, path keys) name keys by string: a renamed
    field left behind in one of them would silently stop applying there."""
    from entrep.config import (INVOCATION_KEYS, PATH_KEYS, PER_MACHINE_KEYS, RANGES, REMOVED, SCORING_KEYS, Config,
                               flat_dict, in_keys, to_dict)

    real = set(flat_dict(to_dict(Config())))
    for name, patterns in (("RANGES", list(RANGES)), ("SCORING_KEYS", SCORING_KEYS), ("INVOCATION_KEYS", INVOCATION_KEYS),
                           ("PER_MACHINE_KEYS", PER_MACHINE_KEYS), ("PATH_KEYS", PATH_KEYS)):
        for p in patterns:
            assert any(in_keys(k, [p]) for k in real), f"{name} names {p!r}, which is no config key"
    assert not set(REMOVED) & real, "a key marked removed is still a field"
    # one prefix rule for all of them: a key named exactly is not a prefix of its neighbours
    assert in_keys("model.slerp.alpha", SCORING_KEYS) and in_keys("infer.topk", SCORING_KEYS)
    assert not in_keys("model.slerp.alpha_gridx", ["model.slerp.alpha"])
    assert not in_keys("model.slerp.train", SCORING_KEYS) and in_keys("speed.compile", INVOCATION_KEYS)
