"""entrep: one fine-tuned CLIP for ENTRep classification, image-to-image and text-to-image retrieval."""


def predict(run, test_dir, overrides=(), **kw):
    """A run's folds (or a blend's runs) ensembled on a test folder, as data (entrep.inference.predict;
    imports torch only when called)."""
    from entrep.inference import predict as _predict

    return _predict(run, test_dir, overrides, **kw)
