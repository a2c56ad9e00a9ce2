"""entrep: one fine-tuned CLIP for ENTRep classification, image-to-image and text-to-image retrieval.

The two library calls (each imports torch only when called):
    entrep.train_fold(run, k, ...)      one fold of a run, as train.py trains it -> FoldResult
    entrep.predict(run, test_dir, ...)  a run's folds (or a blend's runs) on a test folder -> Predictions
"""


def predict(run, test_dir, overrides=(), **kw):
    """A run's folds (or a blend's runs) ensembled on a test folder, as data (entrep/inference.py)."""
    from entrep.cli import setup_logging
    from entrep.inference import predict as _predict

    setup_logging(library=True)  # as train_fold: the kit's INFO lines in a fresh process, the caller's logging kept
    return _predict(run, test_dir, overrides, **kw)


def train_fold(run, k: int, overrides=(), *, config=None, data=None, **kw):
    """Train fold `k` of `run` (a run directory; -1: one model on all data) in this process, exactly as
    `train.py --name RUN train.folds=[k]` would, and return its `training.FoldResult`. An existing
    run's own config.yaml is used unless `config` (a YAML file) is given; `data` is the release folder;
    overrides as for `predict`. The OOF report is written when this completes the run's last fold."""
    from pathlib import Path

    from entrep.commands.train import run_in_process
    from entrep.config import ConfigError, override_item

    try:
        whole = not isinstance(k, bool) and int(k) == k
    except (TypeError, ValueError):
        whole = False
    if not whole:  # int(0.5) would train fold 0
        raise ConfigError(f"train_fold: k={k!r} is not a fold number (0 .. cv.n_splits - 1, or -1 for all data)")
    run = Path(run)
    argv = ["--name", run.name, f"output_dir={run.parent}", f"train.folds=[{int(k)}]", "train.resume=false", *overrides]
    argv += (["--config", str(config)] if config else []) + (["--data", str(data)] if data else [])
    argv += [override_item(key.replace("__", "."), value) for key, value in kw.items()]
    results = run_in_process(argv, library=True)
    if not results:  # train__resume=True on a finished fold: train.py skips it, and so nothing was trained
        raise ConfigError(f"train_fold: fold {int(k)} of {run} finished earlier and train.resume=true skips it; "
                          f"nothing was trained (leave train__resume out to train it again)")
    return results[0]
