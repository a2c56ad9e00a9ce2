"""The wheels an offline image lacks for this kit: see bench/offline_wheels.sh (the command to run).

What the kit needs is requirements.txt. Each requirement, and each of their own requirements in turn
(markers evaluated for the target: CPython X.Y on x86_64 Linux), is either on the image (--have:
nothing is downloaded; a pinned version there must satisfy it) or missing: then the newest wheel
that satisfies every requirement seen for it is downloaded with `pip download --no-deps`, and its
own requirements are walked. One version of each package; the folder holds exactly these wheels
plus bundle.json (what was resolved, for whom, and the inputs it was resolved from).
"""
from __future__ import annotations

import argparse
import email.parser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
except ImportError:  # pip always vendors it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MIB = 64  # the working tree and the wheels together, as the GPU machine takes them
# Linux wheels the image's glibc (>= 2.28: torch's own wheel needs it) can load, newest first.
PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(28, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
INSTALL = "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site {dest}/*.whl"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_have(arg: str) -> tuple[dict[str, str | None], str]:
    """--have: a file (one `name` or `name==version` a line, `pip list --format=freeze` works) or a
    comma-separated list. Returns ({name: version or None}, the text it came from)."""
    text = Path(arg).read_text() if Path(arg).is_file() else arg.replace(",", "\n")
    have = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        have[norm(name.strip())] = version.strip() or None
    return have, text


def read_requirements(path: Path) -> list[Requirement]:
    reqs = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            reqs.append(Requirement(line))
    return reqs


def marker_env(py: str) -> dict:
    return {"python_version": py, "python_full_version": py + ".0", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
            "platform_machine": "x86_64", "os_name": "posix", "platform_release": "", "platform_version": "",
            "implementation_version": py + ".0", "extra": ""}


def applies(req: Requirement, env: dict, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate(dict(env, extra=e)) for e in (extras or {""}) | {""})


class Bundle:
    def __init__(self, py: str, have: dict, staging: Path, pip: list[str]):
        self.py, self.have, self.staging, self.pip = py, have, staging, pip
        self.env = marker_env(py)
        self.fetched: dict[tuple[str, str], Path] = {}  # (name, spec) -> wheel, across restarts

    def download(self, name: str, spec: SpecifierSet) -> Path:
        key = (name, str(spec))
        if key not in self.fetched:
            out = Path(tempfile.mkdtemp(dir=self.staging))
            cmd = [*self.pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", self.py,
                   "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(out),
                   f"{name}{spec}"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(out.glob("*.whl"))
            if r.returncode or len(wheels) != 1:
                raise SystemExit(f"offline_wheels: no wheel of {name}{spec} for CPython {self.py} on x86_64 Linux:\n"
                                 + (r.stderr or r.stdout).strip()[-2000:])
            self.fetched[key] = wheels[0]
        return self.fetched[key]

    def resolve(self, top: list[Requirement]):
        """(missing {name: (version, wheel, [required by])}, image side {name: (version, [(spec, by)])})."""
        narrowed: dict[str, SpecifierSet] = {}
        while True:  # restarts when a later requirement excludes a version already chosen
            restart = False
            chosen: dict[str, tuple[str, Path, list[str]]] = {}
            specs: dict[str, SpecifierSet] = dict(narrowed)
            image: dict[str, tuple[str | None, list[tuple[str, str]]]] = {}
            queue = [(r, "requirements.txt", set()) for r in top]
            while queue:
                req, by, parent_extras = queue.pop(0)
                if not applies(req, self.env, parent_extras):
                    continue
                name = norm(req.name)
                if name in self.have:
                    image.setdefault(name, (self.have[name], []))[1].append((str(req.specifier), by))
                    continue
                specs[name] = specs.get(name, SpecifierSet()) & req.specifier
                if name in chosen:
                    version = chosen[name][0]
                    if specs[name].contains(version, prereleases=True):
                        chosen[name][2].append(by)
                        if not req.extras:
                            continue
                    else:
                        narrowed[name] = specs[name]
                        restart = True
                        break
                wheel = self.download(name, specs[name])
                meta = email.parser.Parser().parsestr(read_metadata(wheel))
                version = meta["Version"]
                if name not in chosen:
                    chosen[name] = (version, wheel, [by])
                for line in meta.get_all("Requires-Dist") or []:
                    queue.append((Requirement(line), f"{name} {version}", set(req.extras)))
            if not restart:
                return chosen, image


def read_metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        return z.read(name).decode()


def tree_bytes() -> int:
    """What the GPU machine copies: tracked files and untracked ones git does not ignore."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True, check=True)
    return sum((ROOT / p).stat().st_size for p in r.stdout.decode().split("\0") if p and (ROOT / p).is_file())


def stamp(py: str, have_text: str, requirements: Path) -> dict:
    """The inputs a bundle was resolved from; a rehearsal rebuilds a bundle whose stamp differs."""
    h = lambda s: hashlib.sha256(s.encode()).hexdigest()[:16]  # noqa: E731
    return {"python": py, "have_sha": h(have_text), "requirements_sha": h(requirements.read_text())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python-version", default="3.12", help="the image's Python, X.Y (default 3.12)")
    ap.add_argument("--have", default=str(ROOT / "bench/offline_image.txt"),
                    help="what the image has: a file (`pip list --format=freeze` works) or name[==version],... "
                         "(default bench/offline_image.txt)")
    ap.add_argument("--dest", default=str(ROOT / ".whl"), help="the wheel folder (default .whl, git-ignored)")
    ap.add_argument("--requirements", default=str(ROOT / "requirements.txt"))
    ap.add_argument("--limit-mib", type=float, default=LIMIT_MIB, help="tree + wheels limit (default 64)")
    args = ap.parse_args()
    have, have_text = read_have(args.have)
    requirements = Path(args.requirements)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory(dir=dest) as staging:
        chosen, image = Bundle(args.python_version, have, Path(staging), pip).resolve(read_requirements(requirements))
        conflicts = [f"  the image's {n}=={v} does not satisfy {spec} (needed by {by})"
                     for n, (v, uses) in sorted(image.items()) for spec, by in uses
                     if v and not SpecifierSet(spec).contains(Version(v), prereleases=True)]
        if conflicts:
            print("offline_wheels: the image's versions do not fit:\n" + "\n".join(conflicts) +
                  "\nCarry another version by leaving that name out of --have (it then comes as a wheel and "
                  "shadows the image's), or lower the requirement.", file=sys.stderr)
            return 2
        keep = {wheel.name for _, wheel, _ in chosen.values()}
        for old in dest.glob("*.whl"):
            if old.name not in keep:
                old.unlink()
        for _, wheel, _ in chosen.values():
            shutil.copy2(wheel, dest / wheel.name)
    rows = [{"name": n, "version": v, "wheel": w.name, "bytes": (dest / w.name).stat().st_size,
             "required_by": sorted(set(by))} for n, (v, w, by) in sorted(chosen.items())]
    image_side = {n: {"version": v, "required_as": sorted({f"{spec or 'any'} by {by}" for spec, by in uses})}
                  for n, (v, uses) in sorted(image.items())}
    wheels = sum(r["bytes"] for r in rows)
    tree = tree_bytes()
    (dest / "bundle.json").write_text(json.dumps(
        {**stamp(args.python_version, have_text, requirements), "wheels": rows,
         "from_image": image_side, "tree_bytes": tree, "wheel_bytes": wheels}, indent=1) + "\n")
    width = max((len(f"{r['name']} {r['version']}") for r in rows), default=0)
    print(f"wheels for what the image lacks (CPython {args.python_version}, x86_64 Linux) in {dest}:")
    for r in rows:
        print(f"  {r['name'] + ' ' + r['version']:<{width}}  {r['bytes'] / 2**10:>8,.0f} KiB  "
              f"needed by {', '.join(r['required_by'])}")
    if not rows:
        print("  none: the image has every package the kit needs")
    print(f"from the image: {', '.join(f'{n} {v}' if v else n for n, (v, _) in sorted(image.items()))}")
    total = (tree + wheels) / 2**20
    print(f"size: tree {tree / 2**20:.2f} MiB + wheels {wheels / 2**20:.2f} MiB = {total:.2f} MiB "
          f"(limit {args.limit_mib:g} MiB)")
    rel = os.path.relpath(dest, ROOT) if dest.resolve().is_relative_to(ROOT) else str(dest)
    print(f"install on the image:  {INSTALL.format(dest=rel)} && export PYTHONPATH=/tmp/site")
    if total > args.limit_mib:
        print(f"offline_wheels: {total:.2f} MiB is over the {args.limit_mib:g} MiB limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
