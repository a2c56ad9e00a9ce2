"""Shared command-line handling: `--config FILE.yaml` plus `key=value` overrides, logging, console."""
from __future__ import annotations

import argparse
import logging

from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=False)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides, dotted keys for nesting: train.epochs=3 model.lora.rank=8")
    return ap


def setup_logging(main_process: bool = True) -> None:
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)], force=True)
    for noisy in ("root", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)  # open_clip logs "no pretrained weights" at WARNING
