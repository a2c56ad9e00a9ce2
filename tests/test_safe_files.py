"""The files the kit writes and reads: an interrupted or failed write keeps the old file, normal permissions,
run-directory arrays and weights never unpickled, odd but valid images converted, a bad one named."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from entrep.data.images import ImageDecodeError, decode_image
from entrep.io import atomic_write_json


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    atomic_write_json(path, {"old": 1})

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left behind


def test_unserialisable_payload_never_truncates(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P"])
def test_valid_odd_images_are_converted(tmp_path, mode):
    arr = np.random.default_rng(0).integers(0, 255, (20, 30), dtype=np.uint8)
    if mode == "I;16":
        im = Image.fromarray(arr.astype(np.uint16) * 257)
    elif mode == "RGBA":
        im = Image.fromarray(np.dstack([arr] * 4))
    else:
        im = Image.fromarray(arr).convert(mode)
    im.save(tmp_path / "x.png")
    out = decode_image(tmp_path / "x.png", 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8 and out.max() > 100


def test_bad_image_error_names_the_file(tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(ImageDecodeError, match=r"x\.png: cannot decode image"):
        decode_image(tmp_path / "x.png", 16)


def test_run_dir_arrays_and_weights_are_never_unpickled(tmp_path):
    from entrep.model.checkpoint import CheckpointError, load_fold_weights
    from entrep.oof import load_fold_oof

    with open(tmp_path / "oof.npz", "wb") as f:
        np.savez(f, head=np.array([object()], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle=False"):
        load_fold_oof(tmp_path / "oof.npz")
    import pickle

    (tmp_path / "kit.safetensors").write_bytes(pickle.dumps({"head.weight": [1.0]}))
    loaded = []
    model = SimpleNamespace(load_kit_state_dict=loaded.append, eval=lambda: None)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_fold_weights(model, tmp_path, "fold0")  # a pickle is not safetensors: refused before reading
    assert loaded == []


def test_atomic_writes_get_normal_permissions(tmp_path):
    atomic_write_json(tmp_path / "r.json", {})
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~umask
    from safetensors.torch import save_file

    from entrep.io import atomic_path

    with atomic_path(tmp_path / "kit.safetensors") as tmp:  # as save_weights writes kit.safetensors
        import torch

        save_file({"x": torch.zeros(2)}, str(tmp))
    assert (tmp_path / "kit.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_zip_bomb_submission_is_refused_before_it_is_unpacked(tmp_path):
    """A member that unpacks far beyond any real submission: refused from the zip's directory, in bounded
    memory (the 200 MB member is never read)."""
    import tracemalloc
    import zipfile

    from entrep.leaderboard import MAX_SUBMISSION_BYTES, ScoreError, read_submission

    bomb = tmp_path / "cls.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("cls.json", "w", force_zip64=True) as f:
            for _ in range(200):
                f.write(b" " * (1 << 20))
    assert bomb.stat().st_size < 1 << 20 and 200 << 20 > MAX_SUBMISSION_BYTES
    tracemalloc.start()
    with pytest.raises(ScoreError, match="unpacks to 209,715,200 bytes, far more than any submission"):
        read_submission(bomb)
    assert tracemalloc.get_traced_memory()[1] < 16 << 20
    tracemalloc.stop()
    big = tmp_path / "t2i.json"
    with open(big, "wb") as f:
        f.truncate(MAX_SUBMISSION_BYTES + 1)
    with pytest.raises(ScoreError, match="far more than any submission"):
        read_submission(big)


def test_an_image_claiming_more_pixels_than_pils_limit_is_refused_before_decoding(tmp_path):
    """PIL only warns between its limit and twice it, and decodes; the kit refuses from the header."""
    from PIL import Image

    from entrep.data.images import ImageDecodeError, decode_image
    from entrep.data.release import check_image

    path = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(path)  # 100 M pixels: over the 89 M limit, under twice it
    assert path.stat().st_size < 1 << 20
    assert "decompression bomb" in check_image(path)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(path, 32)
