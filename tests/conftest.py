import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # the cores shared out among the workers: torch's default of a thread per core would put several
    # threads on each core; set before numpy and torch load, and inherited by the processes tests launch
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
    if "torch" in sys.modules:  # a plugin loaded it first: its thread pool is already sized
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"].split(",")[0]))

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
TRAIN = ["--config", "configs/demo.yaml", "cv.n_splits=2", "train.epochs=1"]  # the smallest real run
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
    return write_real_release(tmp_path_factory.mktemp("entrep_real"))


def write_real_release(root: Path) -> Path:
    """The real training + public-sample annotations, with placeholder images in their folders.
    Public-sample files are written as `_ImageNN` on disk, as in the release."""
    shutil.copytree(REAL / "train", root / "train")
    for i, name in enumerate(real_image_names()):
        placeholder(root / "train/imgs" / name, i)
    shutil.copytree(REAL / "public", root / "public")
    for i, rec in enumerate(json.loads((REAL / "public/data.json").read_text())):
        placeholder(root / "public/images" / rec["Path"].replace("_image", "_Image"), 10_000 + i)
    return root


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    from entrep.data.synthetic import make_demo

    return make_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, size=64, cases=60, test_cases=16,
                     public_cases=12)


@pytest.fixture(scope="session")
def trained_demo_run(demo, tmp_path_factory) -> Path:
    """One uninterrupted `python train.py` run on the demo data (demo config, 2 folds of 1 epoch),
    trained once per session for the slow tests that only read it (copy it before writing into it)."""
    import os
    import subprocess
    import sys

    runs = tmp_path_factory.mktemp("runs")
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/demo.yaml", "cv.n_splits=2", "train.epochs=1",
                        "--data", str(demo), "--name", "a", f"output_dir={runs}"], cwd=Path(__file__).parents[1],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return runs / "a"


@pytest.fixture()
def tiny_cfg():
    from entrep.config import load_config

    return load_config(Path(__file__).parents[1] / "configs/demo.yaml")


def train_tokenizer(folder: Path, captions=(), vocab: int = 200):
    """A WordPiece tokenizer trained on captions and the class prompts, saved as Hugging Face tokenizer
    files: what model.tokenizer=local-dir: reads for a model whose own tokenizer lives on the hub."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from entrep.labels import ENTREP_PROMPTS

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    prompts = [p for ps in ENTREP_PROMPTS.values() for p in ps]
    tok.train_from_iterator(list(captions) + prompts, trainers.WordPieceTrainer(
        vocab_size=vocab, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="session")
def local_tokenizer(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(folder, ["a polyp on the left vocal fold", "erythema of the right nasal cavity",
                             "white discharge", "superior septal deviation"])
    return folder


def py(*args, timeout=600, check=True):
    """`python ARGS` from the project root in a fresh process, for what only a launch can show (a kill,
    a signal, a second process on the same run); refusals run in-process through `one_line`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check:
        assert r.returncode == 0, f"{args}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def one_line(capsys, main, argv) -> str:
    """`main` through run_main: exit 2 and one line, `error: ...` (print_error never wraps it), with no
    traceback; that line."""
    from entrep.cli import run_main

    rc = run_main(main, [str(a) for a in argv])
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert rc == 2 and len(lines) >= 1 and lines[-1].startswith("error: "), out.out + out.err
    assert "Traceback" not in out.out + out.err
    return lines[-1]


def ok(capsys, main, argv) -> str:
    """`main` through run_main: exit 0; what it printed, its wrapping undone."""
    from entrep.cli import run_main

    rc = run_main(main, [str(a) for a in argv])
    out = capsys.readouterr()
    assert rc == 0, out.out[-3000:] + out.err[-3000:]
    return " ".join((out.out + out.err).split())


def inference_settings(cfg, tuned: dict, given: set[str]) -> dict:
    """What infer.py does with a tuned.json's content (entrep.settings: parse, then the command line's
    keys), as the dict it records in meta.json."""
    from entrep.settings import Settings, for_inference

    return for_inference(cfg, Settings.parse(tuned, cfg.infer.tta_flip) if tuned else None, given).as_dict()
