"""python -m entrep.preflight: weights resolved without training, data summary, real steps, estimate;
and the weights checks it shares with training."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from entrep.commands.preflight import Trial, advice, estimate_seconds, plan_fit
from entrep.config import load_config
from entrep.model.backbone import WeightsError, create_clip, resolve_weights

ROOT = Path(__file__).parents[1]


def preflight(*args, env=None):
    env = dict(os.environ, COLUMNS="200", **(env or {}))
    return subprocess.run([sys.executable, "-m", "entrep.preflight", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)


def test_preflight_on_the_demo_config(demo, tmp_path):
    r = preflight("--config", "configs/demo.yaml", "--data", demo, f"output_dir={tmp_path}", "--steps", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for needle in ("random initialisation", "96 images, 95 labelled", "12 file names fixed by case",
                   "trainable of", "fp32 (auto: no GPU)", "train step, batch 32", "img/s", "peak process RSS",
                   "│ batch ", "fits", "eval embedding", "3 folds x 10 epochs x 2 steps of 32"):
        assert needle in out, (needle, out)
    assert "No pretrained weights loaded" not in r.stdout + r.stderr  # asked-for random init is not a warning
    # it says what it is doing while it works, and flags loader workers the cores cannot carry
    assert "building entrep-tiny ..." in out and "timing 1 + 2 train steps at batch 32" in out
    cores = len(os.sched_getaffinity(0))
    r = preflight("--config", "configs/demo.yaml", f"output_dir={tmp_path}", "--steps", "1", f"data.num_workers={cores}")
    assert r.returncode == 0 and f"{cores} loader workers on {cores} cores" in r.stdout
    assert f"data.num_workers={cores - 1}" in r.stdout


@pytest.mark.parametrize("args", [["--steps", "-1"], ["--steps", "0"], ["--images", "0"], ["--images", "-5"]])
def test_preflight_refuses_counts_below_one_before_any_work(args):
    r = preflight("--config", "configs/demo.yaml", *args)
    assert r.returncode == 2 and "each is a count of at least 1" in r.stderr and "building" not in r.stdout


def test_preflight_missing_weights_file_is_one_line(tmp_path):
    r = preflight("--config", "configs/demo.yaml", f"model.pretrained={tmp_path}/clip.safetensors")
    assert r.returncode == 2
    lines = [s for s in (r.stdout + r.stderr).splitlines() if s.strip()]
    assert len(lines) == 1 and "weights file not found" in lines[0] and "model.pretrained" in lines[0], lines


def test_preflight_offline_tag_not_cached_names_the_local_options(tmp_path):
    env = {"HF_HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)}
    r = preflight("--config", "configs/entrep_vitb16.yaml", "model.offline=true", env=env)
    assert r.returncode == 2
    assert "offline and not cached" in r.stdout and "local-dir:" in r.stdout and "Traceback" not in r.stderr


def test_resolve_weights_reads_files_and_local_dirs(tmp_path):
    from safetensors.torch import save_file

    clip, _ = create_clip("entrep-tiny")
    save_file(clip.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    n = len(clip.state_dict())
    assert resolve_weights("entrep-tiny", str(tmp_path / "open_clip_model.safetensors")).endswith(f"{n} tensors")
    with pytest.raises(WeightsError, match="open_clip_config.json"):
        resolve_weights("entrep-tiny", f"local-dir:{tmp_path}")
    cfg = json.loads((ROOT / "entrep/model/configs/entrep-tiny.json").read_text())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    assert "open_clip_model.safetensors" in resolve_weights("entrep-tiny", f"local-dir:{tmp_path}")
    with pytest.raises(WeightsError, match="folder not found"):
        resolve_weights("entrep-tiny", f"local-dir:{tmp_path}/nope")


@pytest.mark.parametrize("kind", ["pickle", "text", "truncated", "not clip"])
def test_a_file_that_is_not_clip_weights_is_one_line(kind, tmp_path):
    """Not torch's UnpicklingError (which suggests weights_only=False) nor a SafetensorError."""
    import pickle

    from safetensors.torch import save_file

    clip, _ = create_clip("entrep-tiny")
    if kind == "pickle":
        path = tmp_path / "w.bin"
        path.write_bytes(pickle.dumps({"visual.x": object()}))
    elif kind == "text":
        path = tmp_path / "w.safetensors"
        path.write_text("not weights")
    elif kind == "truncated":
        path = tmp_path / "w.safetensors"
        save_file(clip.state_dict(), str(path))
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path = tmp_path / "w.safetensors"
        save_file({"encoder.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(WeightsError, match=str(path)) as e:
        create_clip("entrep-tiny", str(path))
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)


def test_another_architectures_weights_are_one_line(tmp_path):
    from safetensors.torch import save_file

    clip, _ = create_clip("entrep-tiny")
    state = {k: v for k, v in clip.state_dict().items() if not k.startswith("transformer.resblocks.3")}
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError, match="do not fit 'entrep-tiny'") as e:
        create_clip("entrep-tiny", str(tmp_path / "w.safetensors"))
    assert "\n" not in str(e.value)


def test_plan_fit_names_what_fits():
    """Without a GPU to run out of memory on: a try_batch that fits only up to 8 images, or only with
    gradient checkpointing, gives the advice a user needs."""
    def fits_up_to(limit, ckpt_bonus=1):
        def try_batch(bs, ckpt):
            return Trial(bs, ckpt, bs <= limit * (ckpt_bonus if ckpt else 1), 10.0, 1.0)
        return try_batch

    first, tried = plan_fit(fits_up_to(64), 64, False)
    assert first.fits and not tried and advice(first, tried) == "fits"
    first, tried = plan_fit(fits_up_to(32, ckpt_bonus=2), 64, False)
    assert advice(first, tried).endswith("it fits with train.grad_checkpointing=true (same batch, ~30% slower steps)")
    first, tried = plan_fit(fits_up_to(8), 64, False)
    assert [(t.batch_size, t.grad_checkpointing) for t in tried] == [(64, True), (32, True), (16, True), (8, True)]
    assert "train.batch_size=8" in advice(first, tried) and "train.grad_accum=8" in advice(first, tried)
    first, tried = plan_fit(fits_up_to(0), 4, True)
    assert "does not fit even at batch 1" in advice(first, tried)


def test_estimate_counts_folds_epochs_steps_and_evaluation():
    cfg = load_config(ROOT / "configs/entrep_vitb16.yaml", ["model.pretrained="])
    est = estimate_seconds(1000, cfg, train_img_s=100.0, eval_img_s=400.0, build_s=10.0)
    # 5 folds; 800 train images -> 13 steps of 64 (832 images) = 8.32 s; 200 val at 400/s = 0.5 s
    assert est["folds"] == 5 and est["steps_per_epoch"] == 13
    assert est["epoch_s"] == pytest.approx(8.32 + 0.5)
    assert est["fold_s"] == pytest.approx(10 + 15 * 8.82 + 2 * 0.5)
    assert est["total_s"] == pytest.approx(5 * est["fold_s"])


def test_an_unreachable_hub_fails_at_once_not_after_a_minute_of_retries(tmp_path):
    """No network (as here and in CI), not offline, tag not cached: one WeightsError within seconds."""
    code = ("import time; from entrep.model.backbone import create_clip, WeightsError\n"
            "t = time.time()\n"
            "try:\n    create_clip('ViT-B-16-quickgelu', 'openai')\n"
            "except WeightsError as e:\n    print('WeightsError', round(time.time() - t), str(e)[:80])\n")
    env = dict(os.environ, HF_HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path))
    env.pop("HF_HUB_OFFLINE", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("WeightsError") and "hub unreachable" in line, r.stdout + r.stderr
    assert int(line.split()[1]) < 45  # the hub client alone retries for about a minute; a busy CI core is slower
