#!/usr/bin/env bash
# Wheels for what an offline GPU image lacks, to carry beside the working tree (run where a registry
# is reachable; any Python 3 with pip works, the wheels are fetched for the image's Python):
#   bash bench/offline_wheels.sh [--python-version 3.12] [--have FILE|name[==ver],...] [--dest .whl]
# What the kit needs is requirements.txt; what the image has is --have, by default
# bench/offline_image.txt (the GPU image this project's checks run on: its header says how that list
# was made). Only the missing packages and their own missing requirements are downloaded
# (`pip download --only-binary=:all: --no-deps --python-version ... --platform manylinux_*_x86_64`),
# one version each, into .whl/ (git-ignored) with bundle.json; then the tree and wheel sizes against
# the 64 MiB limit and the install line for the image. Exit 1 over the limit, 2 when the image's
# pinned versions do not fit the requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/offline_wheels.py "$@"
