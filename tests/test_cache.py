import numpy as np
import pytest

from conftest import placeholder
from entrep.data import images
from entrep.data.images import ImageCache, decode_image
from entrep.data.release import file_sha1


def test_cache_holds_the_same_pixels_as_a_direct_decode_and_follows_file_changes(tmp_path, monkeypatch):
    paths = [tmp_path / f"{i}.png" for i in range(5)]
    for i, p in enumerate(paths):
        placeholder(p, i, size=40)
    cache = ImageCache(tmp_path / "cache", 24)
    px = cache.pixels([str(p) for p in paths], [file_sha1(p) for p in paths])
    for i, p in enumerate(paths):
        assert np.array_equal(px[i], decode_image(p, 24))
    assert np.array_equal(np.asarray(px[np.array([3, 1])]), np.stack([decode_image(paths[3], 24),
                                                                      decode_image(paths[1], 24)]))
    calls = []
    real = images.decode_image
    monkeypatch.setattr(images, "decode_image", lambda p, s, *data: calls.append(p) or real(p, s, *data))
    again = ImageCache(tmp_path / "cache", 24).pixels([str(p) for p in paths], [file_sha1(p) for p in paths])
    assert calls == [] and np.array_equal(np.asarray(again), np.asarray(px))  # nothing re-decoded
    placeholder(paths[2], 99, size=40)  # the file changes: only it is decoded again
    fresh = ImageCache(tmp_path / "cache", 24).pixels([str(p) for p in paths], [file_sha1(p) for p in paths])
    assert calls == [str(paths[2])]
    assert np.array_equal(fresh[2], decode_image(paths[2], 24))
    assert np.array_equal(fresh[0], px[0])
    # segments are immutable: the changed file's pixels went to a second one, the first is untouched
    assert len(list((tmp_path / "cache").glob("seg-24-*.u8"))) == 2


def _fill(paths, cache_dir, out):
    """In a child process: ask the shared cache for `paths` and report whether it gave true pixels."""
    px = ImageCache(cache_dir, 24).pixels([str(p) for p in paths], [file_sha1(p) for p in paths])
    out.put(all(np.array_equal(px[i], decode_image(p, 24)) for i, p in enumerate(paths)))


def test_concurrent_processes_share_the_cache_without_corrupting_it(tmp_path):
    """Processes asking for different (overlapping) image sets at once, three rounds: each gets true
    pixels, and afterwards the index points every image at its own pixels."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    paths = [tmp_path / f"img{i}.png" for i in range(90)]
    for i, p in enumerate(paths):
        placeholder(p, i, size=40)
    cache_dir = tmp_path / "cache"
    for round_ in range(3):
        sets = [paths[round_ * 10:round_ * 10 + 50], paths[round_ * 10 + 30:round_ * 10 + 60],
                paths[::3], paths[1::3]]
        out = ctx.Queue()
        procs = [ctx.Process(target=_fill, args=(s, cache_dir, out)) for s in sets]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
        codes = [p.exitcode for p in procs]
        results = [out.get(timeout=10) for c in codes if c == 0]
        assert codes == [0] * len(procs) and all(results), (round_, codes, results)
    px = ImageCache(cache_dir, 24).pixels([str(p) for p in paths], [file_sha1(p) for p in paths])
    assert all(np.array_equal(px[i], decode_image(p, 24)) for i, p in enumerate(paths))
    assert not list(cache_dir.glob(".*.tmp"))


@pytest.mark.parametrize("damage", ["bytes changed", "truncated"])
def test_a_damaged_segment_is_detected_and_rebuilt_not_read(damage, tmp_path, caplog):
    paths = [tmp_path / f"{i}.png" for i in range(6)]
    for i, p in enumerate(paths):
        placeholder(p, i, size=40)
    hashes = [file_sha1(p) for p in paths]
    ImageCache(tmp_path / "cache", 24).pixels([str(p) for p in paths], hashes)
    (seg,) = (tmp_path / "cache").glob("seg-24-*.u8")
    raw = bytearray(seg.read_bytes())
    if damage == "truncated":
        raw = raw[:1000]
    else:
        raw[100:400] = bytes(300)  # same size, other pixels
    seg.write_bytes(bytes(raw))
    with caplog.at_level("WARNING", logger="entrep.data"):
        px = ImageCache(tmp_path / "cache", 24).pixels([str(p) for p in paths], hashes)
    assert "damaged segments" in caplog.text
    assert all(np.array_equal(px[i], decode_image(p, 24)) for i, p in enumerate(paths))
