"""Out-of-fold figures that predict the leaderboard (issue 21): the challenge's one-target t2i rule,
per-fold macro F1 over the classes a fold holds, and the run-directory guards around them."""
import numpy as np
import pandas as pd
import pytest

from entrep.embedding import Embedded
from entrep.metrics import classification_metrics
from entrep.oof import FoldOOF, pooled_retrieval


def _carriers_fold(k: int = 6, seed: int = 0) -> tuple[FoldOOF, pd.DataFrame]:
    """One held-out fold where every image carries the same caption, and embeddings that cannot tell
    the carriers apart for that caption (what a templated finding like "superior septal deviation" is)."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(k, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    names = [f"img{i}.png" for i in range(k)]
    table = pd.DataFrame({"image": names, "y": [0] * k, "label": ["a"] * k, "partners": [[] for _ in names],
                          "captions": [["superior septal deviation"] for _ in names]})
    caption = emb.mean(0, keepdims=True)
    caption /= np.linalg.norm(caption)
    e = Embedded([np.full((k, 2), 0.5, np.float32)], None, emb, None)
    return FoldOOF(images=names, embedded=e, captions=["superior septal deviation"],
                   caption_emb=caption.astype(np.float32)), table


def test_t2i_has_one_target_per_caption_like_the_leaderboard():
    fold, table = _carriers_fold(k=6)
    view = fold.view(1.0, False)
    challenge = pooled_retrieval({0: view}, table, "t2i")
    assert challenge["n_queries"] == 6  # one query per (caption, image) pair
    assert challenge["recall@1"] == pytest.approx(1 / 6)  # whichever carrier is first answers one query of six
    easy = pooled_retrieval({0: view}, table, "t2i", rule="t2i_any")
    assert easy["n_queries"] == 1 and easy["recall@1"] == 1.0  # the old rule: any carrier counts


def test_the_report_scores_t2i_by_the_challenge_rule_and_shows_the_easy_one_beside_it():
    from entrep.figures import score_folds
    from entrep.tuning import Scored

    fold, table = _carriers_fold(k=4)
    view = fold.view(1.0, False)
    report = score_folds({0: Scored(view, {"i2i": {}, "t2i": {}}, {})}, table, ["a", "b"])
    assert report["t2i"]["n_queries"] == 4 and report["t2i"]["recall@1"] == pytest.approx(0.25)
    assert report["t2i_any"]["recall@1"] == 1.0 and "NOT the challenge" in report["t2i_any"]["relevance"]
    assert "one target per caption" in report["t2i"]["relevance"]


def test_per_fold_macro_f1_averages_the_classes_present_in_that_fold():
    y = [0, 0, 1, 1]  # class 2 is absent from this fold's truth
    perfect = classification_metrics(y, y, ["a", "b", "c"], present_only=True)
    assert perfect["f1_macro"] == 1.0
    assert classification_metrics(y, y, ["a", "b", "c"])["f1_macro"] == pytest.approx(2 / 3)  # today's 0.667


def test_image_cache_never_serves_the_pixels_of_other_bytes(tmp_path):
    """Hash A, rewrite the file to B, fill the cache, restore A: the cache must not hold B's pixels under A."""
    from conftest import placeholder

    from entrep.data.images import ImageCache, ImageDecodeError, decode_image
    from entrep.data.release import file_sha1

    path = tmp_path / "x.png"
    placeholder(path, 1, size=32)
    a = file_sha1(path)
    original = path.read_bytes()
    placeholder(path, 2, size=32)  # B on disk while the cache fills under A's key
    with pytest.raises(ImageDecodeError, match="changed on disk"):
        ImageCache(tmp_path / "cache", 16).pixels([str(path)], [a])
    path.write_bytes(original)
    px = ImageCache(tmp_path / "cache", 16).pixels([str(path)], [a])
    assert np.array_equal(px[0], decode_image(path, 16))


def test_train_on_a_blend_name_is_refused_and_writes_nothing(tmp_path, capsys):
    from entrep.cli import run_main
    from entrep.commands.train import main

    blend = tmp_path / "runs" / "b"
    blend.mkdir(parents=True)
    (blend / "blend.json").write_text('{"members": []}')
    before = sorted(p.name for p in blend.iterdir())
    rc = run_main(main, ["--config", "configs/demo.yaml", "--name", "b", f"output_dir={tmp_path / 'runs'}",
                         f"data.root={tmp_path}"])
    out = capsys.readouterr().out
    assert rc == 2 and "is a blend" in out and len(out.strip().splitlines()) == 1
    assert sorted(p.name for p in blend.iterdir()) == before


def test_output_dir_inside_the_release_is_refused(tmp_path, capsys):
    from entrep.cli import run_main
    from entrep.commands.train import main

    rc = run_main(main, ["--config", "configs/demo.yaml", "--data", str(tmp_path), f"output_dir={tmp_path / 'runs'}"])
    assert rc == 2 and "inside the training release" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_inference_and_blends_use_the_tta_that_tuned_json_was_tuned_with():
    from entrep.config import load_config
    from conftest import inference_settings

    cfg = load_config(None, ["infer.tta_flip=true"])  # a later train.py call changed config.yaml
    tuned = {"tta_flip": False, "head_weight": 0.5, "i2i": {"alpha": 0.1, "rerank": {"kept": {}}},
             "t2i": {"alpha": 0.1, "rerank": {"kept": {}}}}
    assert inference_settings(cfg, tuned, set())["tta_flip"] is False
    assert inference_settings(cfg, tuned, {"infer.tta_flip"})["tta_flip"] is True  # the command line wins


def test_a_refused_second_writer_survives_the_holder_finishing_meanwhile(tmp_path, monkeypatch):
    from pathlib import Path

    from entrep.errors import EntrepError
    from entrep.io import exclusive_run

    with exclusive_run(tmp_path, "train.py"):
        real = Path.read_text

        def vanishing(self, *a, **k):  # the holder removes its owner file between the refusal and the read
            if self.name == ".lock.owner":
                raise FileNotFoundError(2, "No such file", str(self))
            return real(self, *a, **k)

        monkeypatch.setattr(Path, "read_text", vanishing)
        with pytest.raises(EntrepError, match="in use by another process"):
            with exclusive_run(tmp_path, "train.py"):
                pass
