"""Rebuild a run's or blend's report.html from its directory.

    python -m entrep.report RUN [RUN ...] [--data DIR]

The page is written with every report (train.py, entrep.blend); this rebuilds it, e.g. after the
release moved (--data: where its images are now) or for a run reported by an older version of the
kit (its failures.json is made when the run is re-scored: python train.py --name R train.resume=true).
Thumbnails come from the release the run was trained on (config.yaml's data.root; a blend: its first
member's); where that is not found, the page shows image names instead and says so.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from entrep import rundir
from entrep.cli import console, setup_logging
from entrep.config import load_config
from entrep.data.release import load_release
from entrep.errors import EntrepError
from entrep.figures import image_paths
from entrep.io import kit_file, read_json
from entrep.page import write_page

log = logging.getLogger(__name__)


def release_paths(run: Path, data: str | None) -> dict[str, Path] | None:
    """Image name -> file in the release the run was trained on (or `data`); None where it is not found.
    A blend's release is its first member's that is still there."""
    sources = [run]
    if rundir.is_blend(run):
        sources = [(run / m).resolve() for m in read_json(run / rundir.BLEND)["members"]]
    source = next((s for s in sources if (s / rundir.CONFIG).is_file()), None)
    if source is None:
        log.warning("%s: no config.yaml of the run or of any member is there: the page shows image names", run)
        return None
    cfg = load_config(source / rundir.CONFIG)
    root = Path(data or cfg.data.root)
    if not root.is_dir():
        log.warning("%s: the release %s is not found: the page shows image names (pass --data DIR)", run, root)
        return None
    table, _ = load_release(root, list(cfg.labels.names), check_images=False)
    return image_paths(table)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m entrep.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run or blend directories")
    ap.add_argument("--data", help="the release's folder, where it is not the one the run was trained on")
    args = ap.parse_args(argv)
    setup_logging()
    for run in map(Path, args.runs):
        if not (run / rundir.REPORT).is_file():
            raise EntrepError(f"{run}: no {rundir.REPORT}; the page shows a finished run's report (train.py writes "
                              f"it when the last fold finishes)")
        with kit_file(run):  # its report.json, failures.json or blend.json of another shape
            path = write_page(run, release_paths(run, args.data))
        console.print(f"{path}", highlight=False)
    return 0
