import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
REAL = FIXTURES / "entrep"


def placeholder(path: Path, seed: int, size: int = 16) -> None:
    """A small PNG with distinct content (identical pictures would be merged as duplicates)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def real_image_names() -> list[str]:
    cls = json.loads((REAL / "train/cls.json").read_text())
    i2i = json.loads((REAL / "train/i2i.json").read_text())
    t2i = json.loads((REAL / "train/t2i.json").read_text())
    return sorted(set(cls) | set(i2i) | set(i2i.values()) | set(t2i.values()))


@pytest.fixture(scope="session")
def real_release(tmp_path_factory) -> Path:
    """The real training + public-sample annotations, with placeholder images in their folders.
    Public-sample files are written as `_ImageNN` on disk, as in the release."""
    root = tmp_path_factory.mktemp("entrep_real")
    shutil.copytree(REAL / "train", root / "train")
    for i, name in enumerate(real_image_names()):
        placeholder(root / "train/imgs" / name, i)
    shutil.copytree(REAL / "public", root / "public")
    for i, rec in enumerate(json.loads((REAL / "public/data.json").read_text())):
        placeholder(root / "public/images" / rec["Path"].replace("_image", "_Image"), 10_000 + i)
    return root


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    from entrep.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, size=64, cases=60, test_cases=16,
                     public_cases=12)


@pytest.fixture()
def tiny_cfg():
    from entrep.config import load_config

    return load_config(Path(__file__).parents[1] / "configs/demo.yaml")
