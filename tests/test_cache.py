import numpy as np

from conftest import placeholder
from entrep.data import images
from entrep.data.images import ImageCache, decode_image
from entrep.data.release import file_hash


def test_cache_holds_the_same_pixels_as_a_direct_decode_and_follows_file_changes(tmp_path, monkeypatch):
    paths = [tmp_path / f"{i}.png" for i in range(5)]
    for i, p in enumerate(paths):
        placeholder(p, i, size=40)
    cache = ImageCache(tmp_path / "cache", 24)
    px = cache.pixels([str(p) for p in paths], [file_hash(p) for p in paths])
    for i, p in enumerate(paths):
        assert np.array_equal(px[i], decode_image(p, 24))
    assert np.array_equal(np.asarray(px[np.array([3, 1])]), np.stack([decode_image(paths[3], 24),
                                                                      decode_image(paths[1], 24)]))
    calls = []
    real = images.decode_image
    monkeypatch.setattr(images, "decode_image", lambda p, s: calls.append(p) or real(p, s))
    again = ImageCache(tmp_path / "cache", 24).pixels([str(p) for p in paths], [file_hash(p) for p in paths])
    assert calls == [] and np.array_equal(np.asarray(again), np.asarray(px))  # nothing re-decoded
    placeholder(paths[2], 99, size=40)  # the file changes: only it is decoded again
    fresh = ImageCache(tmp_path / "cache", 24).pixels([str(p) for p in paths], [file_hash(p) for p in paths])
    assert calls == [str(paths[2])]
    assert np.array_equal(fresh[2], decode_image(paths[2], 24))
    assert np.array_equal(fresh[0], px[0])
    assert len(list((tmp_path / "cache").glob("store-*"))) == 1  # the old generation is gone
