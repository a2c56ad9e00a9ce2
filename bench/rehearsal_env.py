"""The Python of the CPU rehearsal (bench/gpu_check.sh --rehearse): a venv that holds what the offline
GPU image holds, at its versions, and the wheel bundle for what it lacks.

    python3 bench/rehearsal_env.py     # prints the venv's python on its last line

- Python 3.12 (the image's minor version): REHEARSE_PYTHON, else python3.12 on PATH, else pyenv's.
- The venv is built once and cached under ENTREP_REHEARSAL_CACHE (default ~/.cache/entrep-rehearsal),
  keyed by bench/offline_image.txt and this file, and rebuilt when it no longer meets requirements.txt;
  a later run reuses it and says so.
  What goes in: pip's resolution of requirements.txt plus the image's optional pieces, constrained to
  the versions bench/offline_image.txt pins (torch 2.11.0, torchvision 0.26.0, numpy 2.5.2,
  accelerate 1.15.0, transformers 5.17.0, ...; the newest release for a name it gives without a
  version), less what the bundle carries (those must come from .whl/ as on the image), installed
  with --no-deps. torch 2.11.0 is PyPI's CUDA build: its libraries link the CUDA runtime, cuBLAS,
  cuDNN, cuFFT, cuRAND, cuSPARSE(Lt), cuFile, NCCL and NVSHMEM, so those come too (it does not
  import without them); triton, cuSOLVER, NVRTC, CUPTI and NVTX are only loaded on a GPU and stay out.
- The bundle is .whl/ from bench/offline_wheels.sh with the default image list; built (or rebuilt
  when requirements.txt or the list changed since) here.
Exit 75 when the registry is unreachable and nothing is cached, 76 when no Python 3.12 is found.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_LIST = ROOT / "bench/offline_image.txt"
PY_MINOR = "3.12"
OPTIONAL = ["tensorboard"]  # on the image; the kit's train.log_with=tensorboard
GPU_ONLY = {"triton", "nvidia-cusolver", "nvidia-cuda-nvrtc", "nvidia-cuda-cupti", "nvidia-nvtx"}
NO_REGISTRY, NO_PYTHON = 75, 76

sys.path.insert(0, str(ROOT / "bench"))
import offline_wheels  # noqa: E402


def say(msg: str) -> None:
    print(f"rehearsal: {msg}", file=sys.stderr, flush=True)


def find_python() -> str | None:
    pyenv = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates = [os.environ.get("REHEARSE_PYTHON", ""), shutil.which(f"python{PY_MINOR}") or "",
                  *sorted(glob.glob(f"{pyenv}/versions/{PY_MINOR}.*/bin/python{PY_MINOR}"), reverse=True)]
    for c in filter(None, candidates):
        r = subprocess.run([c, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip() == PY_MINOR:
            return c
    return None


def registry_reachable() -> bool:
    index = os.environ.get("PIP_INDEX_URL") or subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True, text=True
    ).stdout.strip() or "https://pypi.org/simple"
    try:
        urllib.request.urlopen(index.rstrip("/") + "/pip/", timeout=20).close()
        return True
    except Exception as e:  # noqa: BLE001 - DNS, proxy, TLS, HTTP: all mean "no registry from here"
        say(f"registry {index} unreachable: {type(e).__name__}: {e}")
        return False


def image_list() -> dict[str, str | None]:
    return offline_wheels.read_have(str(IMAGE_LIST))[0]


def cache_key(python: str) -> str:
    h = hashlib.sha256()
    for f in (IMAGE_LIST, Path(__file__)):
        h.update(f.read_bytes())
    h.update(python.encode())
    return h.hexdigest()[:12]


def venv_misses(info: dict, bundle: list[str]) -> list[str]:
    """The requirements of today's requirements.txt that a cached venv (ready.json) does not meet."""
    carried = {offline_wheels.norm(n) for n in bundle}
    misses = []
    for req in offline_wheels.read_requirements(ROOT / "requirements.txt"):
        name = offline_wheels.norm(req.name)
        version = info["installed"].get(name)
        if name not in carried and (version is None or not req.specifier.contains(version, prereleases=True)):
            misses.append(f"{req} (venv: {version or 'absent'})")
    return misses


def current_bundle() -> dict | None:
    """.whl/bundle.json when .whl/ was made for the default image list from today's requirements.txt."""
    dest = ROOT / ".whl"
    want = offline_wheels.stamp(PY_MINOR, IMAGE_LIST.read_text(), ROOT / "requirements.txt")
    try:
        meta = json.loads((dest / "bundle.json").read_text())
        if all(meta.get(k) == v for k, v in want.items()) and all((dest / w["wheel"]).is_file() for w in meta["wheels"]):
            return meta
    except (OSError, ValueError, KeyError):
        pass
    return None


def build_bundle() -> dict:
    say(("bundle .whl/ was made from other inputs: rebuilding it" if (ROOT / ".whl/bundle.json").is_file()
         else "no bundle .whl/: building it") + " with bench/offline_wheels.sh for the default image list")
    r = subprocess.run([sys.executable, str(ROOT / "bench/offline_wheels.py"), "--python-version", PY_MINOR],
                       stdout=sys.stderr)
    if r.returncode:
        raise SystemExit(r.returncode)
    return json.loads((ROOT / ".whl/bundle.json").read_text())


def pip(python: str, *args: str) -> None:
    """pip, its output on stderr less this machine's notes about index folders it skips."""
    r = subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True)
    for line in (r.stdout + r.stderr).splitlines():
        if "is ignored: it is neither a file nor a directory" not in line:
            print(line, file=sys.stderr)
    if r.returncode:
        raise SystemExit(f"rehearsal: pip {args[0]} failed (exit {r.returncode})")


def build(venv: Path, python: str, bundle: list[str]) -> dict:
    tmp = venv.with_name(venv.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([python, "-m", "venv", str(tmp)], check=True)
    vpy = str(tmp / "bin/python")
    have = image_list()
    pins = tmp / "image-pins.txt"
    pins.write_text("".join(f"{n}=={v}\n" for n, v in have.items() if v))
    wheels = tmp / "wheels"
    say("resolving and downloading requirements.txt against the image's pinned versions (pip download)")
    pip(vpy, "download", "-q", "--only-binary=:all:", "-d", str(wheels), "-c", str(pins),
        "-r", str(ROOT / "requirements.txt"), *OPTIONAL)
    resolved = {offline_wheels.norm(w.name.split("-")[0]): (w.name.split("-")[1], w) for w in wheels.glob("*.whl")}
    carried = {offline_wheels.norm(n) for n in bundle}
    install = {n: vw for n, vw in resolved.items() if n not in carried and n not in GPU_ONLY}
    beyond = sorted(n for n in install if n not in have)
    say(f"installing {len(install)} packages with --no-deps (left to the bundle: {', '.join(sorted(carried))}; "
        f"GPU-only, left out: {', '.join(sorted(GPU_ONLY & set(resolved)))})")
    pip(vpy, "install", "-q", "--no-index", "--no-deps", *[str(w) for _, w in install.values()])
    shutil.rmtree(wheels)
    subprocess.run([vpy, "-c", "import torch; torch.ones(2) @ torch.ones(2)"], check=True)
    info = {"python": subprocess.run([vpy, "-c", "import platform; print(platform.python_version())"],
                                     capture_output=True, text=True).stdout.strip(),
            "installed": {n: v for n, (v, _) in sorted(install.items())}, "not_on_image_list": beyond}
    (tmp / "ready.json").write_text(json.dumps(info, indent=1) + "\n")
    tmp.rename(venv)
    return info


def main() -> int:
    t0 = time.perf_counter()
    python = find_python()
    if not python:
        say(f"no Python {PY_MINOR} found (set REHEARSE_PYTHON, put python{PY_MINOR} on PATH, or "
            f"`pyenv install {PY_MINOR}`)")
        return NO_PYTHON
    root = Path(os.environ.get("ENTREP_REHEARSAL_CACHE", Path.home() / ".cache/entrep-rehearsal"))
    venv = root / f"py{PY_MINOR}-{cache_key(python)}"
    def need_registry(what: str) -> None:
        if not registry_reachable():
            say(f"cannot build {what} without the registry")
            raise SystemExit(NO_REGISTRY)

    meta = current_bundle()
    if meta:
        say(f"bundle .whl/ is current: {', '.join(w['name'] + ' ' + w['version'] for w in meta['wheels'])}")
    else:
        need_registry("the bundle .whl/")
        meta = build_bundle()
    bundle = [w["name"] for w in meta["wheels"]]
    info = json.loads((venv / "ready.json").read_text()) if (venv / "ready.json").is_file() else None
    misses = venv_misses(info, bundle) if info else []
    if misses:
        say(f"the cached venv does not meet requirements.txt ({'; '.join(misses)}): building it again")
        shutil.rmtree(venv)
        info = None
    if info:
        say(f"reusing the cached venv {venv} (Python {info['python']}, "
            f"torch {info['installed'].get('torch')}; built once, {time.perf_counter() - t0:.0f} s to check)")
    else:
        need_registry("the rehearsal's venv")
        say(f"building the venv {venv} with {python} (once; later runs reuse it)")
        root.mkdir(parents=True, exist_ok=True)
        info = build(venv, python, bundle)
        for old in root.glob(f"py{PY_MINOR}-*"):
            if old != venv:
                say(f"removing the stale venv {old}")
                shutil.rmtree(old, ignore_errors=True)
        say(f"built in {time.perf_counter() - t0:.0f} s: Python {info['python']}, " + ", ".join(
            f"{n} {info['installed'][n]}" for n in ("torch", "torchvision", "numpy", "accelerate", "peft", "timm",
                                                      "transformers", "huggingface-hub") if n in info["installed"]))
        if info["not_on_image_list"]:
            say("installed though not on the image's list (pulled by the newest releases of names the list gives "
                f"without a version): {', '.join(info['not_on_image_list'])}")
    print(venv / "bin/python")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
