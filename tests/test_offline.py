"""The offline GPU image path (docs/offline.md): the wheel bundle's resolution, the import check, and
the import part of the CPU rehearsal in a Python 3.12 venv with the image's versions."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import offline_wheels  # noqa: E402

NO_REGISTRY, NO_PYTHON = 75, 76  # bench/rehearsal_env.py


def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
    return path


class FakeIndex(offline_wheels.Bundle):
    """The resolver against a made-up index: {name: {version: [requirements]}}, newest first."""

    def __init__(self, index: dict, have: dict, tmp: Path):
        super().__init__("3.12", have, tmp, pip=[])
        self.index, self.calls = index, []

    def download(self, name, spec):
        self.calls.append((name, str(spec)))
        version = next(v for v in self.index[name] if spec.contains(v, prereleases=True))
        return fake_wheel(self.staging, name, version, self.index[name][version])


def resolve(index, have, top, tmp):
    b = FakeIndex(index, have, tmp)
    chosen, image = b.resolve([offline_wheels.Requirement(r) for r in top])
    return {n: v for n, (v, _, _) in chosen.items()}, image, b.calls


def test_bundle_holds_only_what_the_image_lacks_with_their_own_missing_requirements(tmp_path):
    index = {"open-clip-torch": {"3.3.0": ["torch>=2.0", "ftfy", "regex", "timm>=1.0.17",
                                           "pytest; extra == 'test'", "colorama; sys_platform == 'win32'"]},
             "ftfy": {"6.3.1": ["wcwidth"]}, "wcwidth": {"0.9.4": []},
             "imagehash": {"4.3.2": ["numpy", "pywavelets", "scipy"]}, "pywavelets": {"1.10.0": ["numpy>=1.25"]}}
    have = {"torch": "2.11.0", "regex": None, "timm": None, "numpy": "2.5.2", "scipy": None}
    chosen, image, _ = resolve(index, have, ["open_clip_torch>=3.0", "imagehash>=4.3", "numpy>=2.0"], tmp_path)
    assert chosen == {"open-clip-torch": "3.3.0", "ftfy": "6.3.1", "wcwidth": "0.9.4", "imagehash": "4.3.2",
                      "pywavelets": "1.10.0"}  # no extra's, no other platform's, nothing the image has
    assert set(image) == {"torch", "regex", "timm", "numpy", "scipy"}


def test_a_later_requirement_narrows_a_chosen_version_to_one_version(tmp_path):
    index = {"a": {"2.0": [], "1.5": []}, "b": {"1.0": ["a<2"]}}
    chosen, _, calls = resolve(index, {}, ["a", "b"], tmp_path)
    assert chosen == {"a": "1.5", "b": "1.0"}
    assert ("a", "<2") in calls  # resolved again with both requirements, not kept at 2.0


def test_an_image_version_that_misses_a_requirement_is_reported(tmp_path, monkeypatch, capsys):
    index = {"open-clip-torch": {"3.3.0": ["torch>=2.12"]}}
    monkeypatch.setattr(offline_wheels, "Bundle", lambda py, have, staging, pip: FakeIndex(index, have, staging))
    req = tmp_path / "requirements.txt"
    req.write_text("open_clip_torch>=3.0  # comment\n")
    monkeypatch.setattr(sys, "argv", ["offline_wheels", "--have", "torch==2.11.0", "--requirements", str(req),
                                      "--dest", str(tmp_path / "whl")])
    assert offline_wheels.main() == 2
    assert "the image's torch==2.11.0 does not satisfy >=2.12 (needed by open-clip-torch 3.3.0)" in capsys.readouterr().err


def test_have_list_reads_pip_freeze_files_and_comma_lists(tmp_path):
    f = tmp_path / "have.txt"
    f.write_text("# comment\nTorch==2.11.0\nhuggingface_hub==1.33.0\nregex\n")
    assert offline_wheels.read_have(str(f))[0] == {"torch": "2.11.0", "huggingface-hub": "1.33.0", "regex": None}
    assert offline_wheels.read_have("torch==2.11.0,Py_Yaml")[0] == {"torch": "2.11.0", "py-yaml": None}
    default = offline_wheels.read_have(str(ROOT / "bench/offline_image.txt"))[0]
    assert default["torch"] == "2.11.0" and "open-clip-torch" not in default and "imagehash" not in default


def test_wheel_folder_is_ignored_by_git():
    r = subprocess.run(["git", "check-ignore", "-q", ".whl/x.whl"], cwd=ROOT)
    assert r.returncode == 0


@pytest.mark.slow
def test_import_check_passes_in_this_environment(tmp_path):
    r = subprocess.run([sys.executable, "bench/import_check.py", "--json", str(tmp_path / "i.json")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    report = json.loads((tmp_path / "i.json").read_text())
    assert report["failures"] == [] and report["entrep_modules"] > 30
    assert set(report["apis"].values()) == {"ok"}


@pytest.mark.slow
def test_rehearsal_imports_on_the_images_python_and_versions_with_the_bundle(tmp_path):
    """The import part of `bash bench/gpu_check.sh --rehearse`: the cached Python 3.12 venv with the image's
    versions (built once: a few minutes and ~4 GB under ~/.cache/entrep-rehearsal), .whl/ installed as on
    the image (--no-index --no-deps --target, PYTHONPATH), then bench/import_check.py."""
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--rehearse", "--imports"], cwd=ROOT, capture_output=True,
                       text=True, timeout=2400, env=dict(os.environ, OUT=str(tmp_path)))
    log = r.stdout + r.stderr
    if r.returncode == NO_PYTHON:
        pytest.skip("no Python 3.12 here (the image's Python): " + log.strip().splitlines()[-1])
    if r.returncode == NO_REGISTRY:
        pytest.skip("the package registry is unreachable and no rehearsal venv is cached")
    assert r.returncode == 0, log[-6000:]
    report = json.loads((tmp_path / "imports.json").read_text())
    pk = report["packages"]
    assert report["python"].startswith("3.12.")
    assert pk["torch"]["version"].startswith("2.11.0") and pk["torchvision"]["version"].startswith("0.26.0")
    assert pk["accelerate"]["version"] == "1.15.0" and pk["numpy"]["version"] == "2.5.2"
    bundle = json.loads((ROOT / ".whl/bundle.json").read_text())
    carried = {n for n, row in pk.items() if row["from"] == "carried"}
    assert carried == {"open-clip-torch"}  # the kit's own requirements the image lacks
    assert carried <= {w["name"] for w in bundle["wheels"]}
    assert report["failures"] == []
