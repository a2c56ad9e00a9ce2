"""Shared command-line handling: `--config FILE.yaml` plus `key=value` overrides, logging, console."""
from __future__ import annotations

import argparse
import logging
import os

from rich.console import Console
from rich.logging import RichHandler

def make_console(**kwargs) -> Console:
    """rich's console; piped into a log (nohup, SLURM, Kaggle) it would cut every line at 80 columns,
    so off a terminal it is 200 wide unless COLUMNS says otherwise."""
    c = Console(**kwargs)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c.width = 200
    return c


console = make_console(stderr=False)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides, dotted keys for nesting: train.epochs=3 model.lora.rank=8")
    return ap


def setup_logging(main_process: bool = True) -> None:
    """The kit's loggers at INFO on the main process; libraries (open_clip logs on the root) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)], force=True)
    logging.getLogger("entrep").setLevel(logging.INFO if main_process else logging.WARNING)


def run_main(main) -> int:
    """Run an entry point; a known user error prints one clear line (no traceback) and exits 2."""
    from rich.markup import escape

    from entrep.errors import EntrepError

    try:
        return main()
    except EntrepError as e:
        console.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except PermissionError as e:  # an unwritable output_dir, --out or cache folder
        console.print(f"[bold red]error:[/bold red] cannot write {escape(str(e.filename))}: {e.strerror}; choose a "
                      f"folder you can write to (output_dir=..., --out ...)", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        # every file is written atomically, so what was finished stays finished
        console.print("interrupted. Finished folds are kept: add train.resume=true to the same train.py command "
                      "to continue from the first unfinished fold.", highlight=False, soft_wrap=True)
        return 130
