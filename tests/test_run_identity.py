"""A run is tied to its content, its launch and its settings (issue 22): data that changed under the same
names, another effective batch, processes given other arguments, a picture with two labels, SIGTERM,
what the launcher was asked for and does not do, and a first call that fails before any fold starts."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from entrep.config import load_config
from entrep.errors import EntrepError
from entrep.training import claim_run, launcher_mismatches

ROOT = Path(__file__).parents[1]


def _table(n=4):
    return pd.DataFrame({"image": [f"i{k}.png" for k in range(n)], "sha1": [f"{k:040x}" for k in range(n)],
                         "label": ["nose-left", "ear-left", None, "throat"][:n], "captions": [["a polyp"], [], [], []],
                         "partners": [["i1.png"], ["i0.png"], [], []]})


def _accelerator(processes=1):
    return SimpleNamespace(num_processes=processes, mixed_precision="no")


def _cfg(tmp_path, *overrides):
    return load_config(ROOT / "configs/demo.yaml", [f"output_dir={tmp_path}", "name=r", *overrides])


@pytest.mark.parametrize("change, says", [
    (lambda t: t.assign(label=["nose-right", "ear-left", None, "throat"]), "labels changed (e.g. i0.png: nose-left -> nose-right)"),
    (lambda t: t.assign(sha1=[f"{k + 9:040x}" for k in range(4)]), "pixels changed"),
    (lambda t: t.assign(captions=[["a cyst"], [], [], []]), "captions changed"),
    (lambda t: t.assign(partners=[[], [], [], []]), "i2i links changed"),
    (lambda t: t.iloc[:3], "images gone"),
])
def test_the_same_names_with_other_content_are_refused(tmp_path, change, says):
    cfg = _cfg(tmp_path)
    claim_run(cfg, _table(), _accelerator())
    claim_run(cfg, _table(), _accelerator())  # the same content: fine
    with pytest.raises(EntrepError, match="trained on other data") as e:
        claim_run(cfg, change(_table()), _accelerator())
    assert says in str(e.value)


def test_another_effective_batch_is_refused_with_the_accumulation_that_keeps_it(tmp_path):
    claim_run(_cfg(tmp_path), _table(), _accelerator(processes=2))  # fold 0 trained on 2 processes
    with pytest.raises(EntrepError, match=r"effective batch of 64 .* gives 32 .*train\.grad_accum=2"):
        claim_run(_cfg(tmp_path), _table(), _accelerator(processes=1))
    claim_run(_cfg(tmp_path, "train.grad_accum=2"), _table(), _accelerator(processes=1))  # the fix is accepted


def test_a_picture_filed_with_two_labels_stops_training_or_trains_unlabelled(tmp_path):
    from conftest import placeholder

    from entrep.data.release import DataError
    from entrep.labels import LabelSet
    from entrep.training import read_training_release

    root = tmp_path / "rel"
    for i in range(3):
        placeholder(root / "train/imgs" / f"t{i}.png", i)
    placeholder(root / "public/images" / "1_2_3_Image01.png", 0)  # the same picture as t0.png
    (root / "train/cls.json").write_text(json.dumps({"t0.png": "nose-left", "t1.png": "ear-left",
                                                     "t2.png": "throat"}))
    (root / "public/data.json").write_text(json.dumps([{"Path": "1_2_3_image01.png", "Classification": "nose-right"}]))
    cfg = load_config(ROOT / "configs/demo.yaml", [f"data.root={root}"])
    labels = LabelSet.from_config(cfg.labels)
    with pytest.raises(DataError, match=r"filed with two labels .*nose-left vs nose-right.*label_conflicts=unlabel"):
        read_training_release(cfg, labels)
    cfg = load_config(ROOT / "configs/demo.yaml", [f"data.root={root}", "data.label_conflicts=unlabel"])
    table = read_training_release(cfg, labels).set_index("image")
    conflicted = [n for n in table.index if n in ("t0.png", "1_2_3_Image01.png")]
    assert len(conflicted) == 1 and table.loc[conflicted[0], "y"] == -1 and table.loc["t1.png", "y"] >= 0


def test_sigterm_gives_the_resume_hint_and_exit_143(capsys, terminal_signals):
    from entrep.cli import run_main

    def main(argv=None):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    assert run_main(main) == 143
    out = capsys.readouterr().out
    assert "terminated (SIGTERM)" in out and "train.resume=true" in out


def test_what_the_launcher_was_asked_for_and_does_not_happen_is_said(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    said = launcher_mismatches(_accelerator())
    assert any("--mixed_precision bf16 is not used" in s for s in said)
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "launch", "--num_processes", "2",
                             "train.py"])
    try:
        time.sleep(0.3)
        monkeypatch.setattr(os, "getppid", lambda: fake.pid)
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
        said = launcher_mismatches(_accelerator())
        assert any("--num_processes 2 started one process: add --multi_gpu" in s for s in said)
    finally:
        fake.kill()


def test_a_first_call_that_fails_on_its_data_writes_no_identity(tmp_path, capsys):
    """Fixing the data and running the corrected command again is not refused as 'other values'."""
    from entrep.cli import run_main
    from entrep.commands.train import main

    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--config", "configs/demo.yaml", "--data", str(empty), "--name", "x", f"output_dir={tmp_path / 'runs'}"]
    assert run_main(main, argv) == 2 and "no cls.json" in capsys.readouterr().out
    assert not (tmp_path / "runs/x/config.yaml").exists() and not (tmp_path / "runs/x/run.json").exists()


def test_preflight_says_when_a_busy_cpu_slowed_its_steps():
    from entrep.commands.preflight import busy_note

    assert busy_note(0.9) == ""
    assert "machine was busy" in busy_note(0.3) and "30%" in busy_note(0.3)


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")  # a timed 2-process launch: never beside another (tests/test_launch.py)
def test_processes_given_other_arguments_stop_at_start_up_naming_the_key(demo, tmp_path):
    """Two processes over gloo whose command lines differ (train.epochs): both stop within seconds."""
    script = tmp_path / "launch_me.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from entrep.cli import run_main\n"
        "from entrep.commands.train import main\n"
        "extra = ['train.epochs=2'] if os.environ.get('RANK') == '1' else []\n"
        "sys.exit(run_main(main, sys.argv[1:] + extra))\n")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
                        "--config", "configs/demo.yaml", "--data", str(demo), "--name", "x", "cv.n_splits=2",
                        f"output_dir={tmp_path / 'runs'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, ACCELERATE_USE_CPU="true", COLUMNS="200"))
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "were given different settings: train.epochs" in out, out[-3000:]
    assert time.time() - t0 < 120
    assert not (tmp_path / "runs/x/config.yaml").exists()


@pytest.fixture()
def terminal_signals():
    """SIGINT and SIGTERM as a process started from a terminal has them: a runner that started pytest in
    the background (`cmd &` in a script) leaves SIGINT ignored, and run_main keeps an ignored signal so."""
    before = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, signal.default_int_handler),
                                                   (signal.SIGTERM, signal.SIG_DFL))}
    yield
    for s, h in before.items():
        signal.signal(s, h)


class _Swallows:
    """Sends a signal from inside __del__: its handler runs there, and Python only prints what it raises."""

    def __init__(self, signum):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # nor printed as a traceback
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("after", ["a step", "the last step", "an error"])
def test_a_signal_swallowed_by_a_destructor_still_stops_the_run(signum, code, after, capsys, terminal_signals):
    """Python ignores an exception raised in a __del__; a signal whose handler runs there must not be lost
    (CI once saw Ctrl-C during training end in a finished run and exit 0): the next step raises it, or
    run_main when the entry point returns, or an error on the way out is reported as the interruption."""
    from entrep.cli import raise_if_interrupted, run_main

    steps = []

    def main(argv=None):
        for i in range(3):
            if i == {"a step": 1, "the last step": 2, "an error": 2}[after]:
                _Swallows(signum)
                if after == "an error":
                    raise EntrepError("a file the interruption left half-read")
            if after != "the last step":
                raise_if_interrupted()
            steps.append(i)
        return 0

    before = signal.getsignal(signum)
    assert run_main(main) == code and steps == {"a step": [0], "the last step": [0, 1, 2], "an error": [0, 1]}[after]
    out = capsys.readouterr()
    assert "train.resume=true" in out.out and "half-read" not in out.out + out.err and "Traceback" not in out.err
    assert signal.getsignal(signum) is before  # an in-process caller gets its own handler back
    raise_if_interrupted()  # nothing left pending once run_main has reported it


def test_a_signal_the_caller_ignores_stays_ignored():
    """`train.py &` in a script starts with SIGINT ignored: the shell's Ctrl-C is not meant for it."""
    from entrep.cli import run_main

    seen = []
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert run_main(lambda argv=None: seen.append(signal.getsignal(signal.SIGINT)) or 0) == 0
        assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
