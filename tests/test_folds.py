import pandas as pd
import pytest

from entrep.data.folds import FoldError, link_groups, load_or_make_folds, make_folds
from entrep.data.release import load_release
from entrep.labels import ENTREP_CLASSES


@pytest.fixture(scope="module")
def real_df(real_release):
    return load_release(real_release / "train", ENTREP_CLASSES, check_images=False)[0]


def test_chains_form_one_component(real_df):
    groups = pd.Series(link_groups(real_df), index=real_df["image"])
    sizes = groups.value_counts()
    assert sizes.max() >= 3  # the real i2i.json has chains a->b->c, not only pairs
    for img, partners in zip(real_df["image"], real_df["partners"]):
        assert all(groups[p] == groups[img] for p in partners)


def test_no_pair_split_and_unlabelled_follow_their_component(real_df):
    folds = make_folds(real_df, 5, seed=1).set_index("image")
    for img, partners in zip(real_df["image"], real_df["partners"]):
        assert all(folds.loc[p, "fold"] == folds.loc[img, "fold"] for p in partners)
    assert folds["fold"].between(0, 4).all()
    unl = real_df.loc[real_df["y"] < 0, "image"]
    assert len(unl) == 68 and folds.loc[unl, "fold"].between(0, 4).all()


def test_folds_are_stratified(real_df):
    folds = make_folds(real_df, 5, seed=1)
    table = pd.crosstab(folds.loc[real_df["y"] >= 0, "label"], folds["fold"])
    share = table.div(table.sum(axis=1), axis=0)
    assert (share - 0.2).abs().max().max() < 0.06


def test_seed_determinism(real_df):
    a, b, c = (make_folds(real_df, 5, s) for s in (3, 3, 4))
    assert a.equals(b)
    assert not a["fold"].equals(c["fold"])


def test_folds_file_is_frozen(tmp_path, real_df):
    path = tmp_path / "folds.csv"
    first = load_or_make_folds(path, real_df, 5, 3)
    again = load_or_make_folds(path, real_df, 5, seed=999)  # the saved file wins
    assert first["fold"].tolist() == again["fold"].tolist()
    with pytest.raises(FoldError, match="does not match the data"):
        load_or_make_folds(path, real_df.iloc[:-1], 5, 3)


def test_too_many_folds_names_the_class(real_df):
    with pytest.raises(FoldError, match=r"class 'throat' has only 81"):
        make_folds(real_df, 82, 0)
