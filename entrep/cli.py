"""What every command line shares: the parser with `--config` and `key=value` overrides, logging,
the console, progress bars, and `run_main`, which turns the kit's errors into one line."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from entrep.errors import EntrepError


def make_console(**kwargs) -> Console:
    """rich's console; piped into a log (nohup, SLURM, Kaggle) it would cut every line at 80 columns,
    so off a terminal it is 200 wide unless COLUMNS says otherwise."""
    c = Console(**kwargs)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c.width = 200
    return c


console = make_console(stderr=False)


def parser(prog: str, description: str, *, config: str | None = "YAML config", raw: bool = False
           ) -> argparse.ArgumentParser:
    """A command's parser: `key=value` overrides (dotted keys for nesting), and `--config` unless
    `config` is None (its help text otherwise). `raw`: keep the description's line breaks."""
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter)
    if config is not None:
        ap.add_argument("--config", help=config)
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides, dotted keys for nesting: train.epochs=3 model.lora.rank=8")
    return ap


def setup_logging(main_process: bool = True, library: bool = False) -> None:
    """The kit's loggers at INFO on the main process; libraries (open_clip logs on the root) at WARNING.
    `library` (entrep.predict, entrep.train_fold): the same in a fresh process, but logging the caller
    set up (handlers on the root logger) is kept, with only the kit's level set."""
    root = logging.getLogger()
    if library and root.handlers and not any(isinstance(h, RichHandler) for h in root.handlers):
        logging.getLogger("entrep").setLevel(logging.INFO if main_process else logging.WARNING)
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)], force=True)
    logging.getLogger("entrep").setLevel(logging.INFO if main_process else logging.WARNING)


def print_error(message: str) -> None:
    """`error: message`: control characters from a file's content shown escaped (a terminal would act on
    them), and a message holding a huge value (a 200,000-character key) cut in the middle."""
    message = "".join(c if c == "\n" or c.isprintable() else repr(c)[1:-1] for c in message)
    if len(message) > 1500:
        message = f"{message[:1000]} [... {len(message) - 1300} characters ...] {message[-300:]}"
    console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, Kaggle and `kill` send): handled as Ctrl-C is, with the resume hint."""


# run_main's signal state: every SIGINT/SIGTERM its handler took, and whether it is already reporting one
_received: list[int] = []
_reporting = [False]


def _interrupt(signum, frame):
    _received.append(signum)
    if not _reporting[0]:  # once the interruption is being reported, a second Ctrl-C lets that finish
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def raise_if_interrupted() -> None:
    """Raise again a Ctrl-C or SIGTERM that was swallowed: Python ignores an exception raised inside a
    __del__ or a gc callback, which is where a signal's handler runs when it lands there. The loops
    that take long (train steps, embedding batches, folds) and run_main itself call this, so no signal
    is lost."""
    if _received:
        raise Terminated() if _received[-1] == signal.SIGTERM else KeyboardInterrupt()


def _quiet_swallowed(hook):
    """sys.unraisablehook without the traceback of a swallowed interruption: it is recorded, and
    reported once, by run_main."""
    def quiet(unraisable):
        if not (unraisable.exc_type and issubclass(unraisable.exc_type, KeyboardInterrupt)):
            hook(unraisable)
    return quiet


def _report_interrupt(sigterm: bool) -> int:
    # every file is written atomically, so what was finished stays finished
    console.print(f"{'terminated (SIGTERM)' if sigterm else 'interrupted'}. Finished folds are kept: add "
                  f"train.resume=true to the same train.py command to continue from the first unfinished fold.",
                  highlight=False, soft_wrap=True)
    return 143 if sigterm else 130


def run_main(main, argv=None) -> int:
    """Run an entry point (`main(argv)`, or the dotted name of a module whose `main` it is: imported
    here, after the handlers are in place, so a Ctrl-C during pandas' or torch's import is the same
    exit 130 as one later); a known user error prints one clear line (no traceback) and exits 2,
    Ctrl-C exits 130 and SIGTERM 143, each with the resume hint."""
    before, hook = {}, sys.unraisablehook
    _received.clear()
    _reporting[0] = False
    try:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                # ignored stays ignored, as Python does (`cmd &` in a script: a background job ignores Ctrl-C)
                if signal.getsignal(s) is not signal.SIG_IGN:
                    before[s] = signal.signal(s, _interrupt)
            sys.unraisablehook = _quiet_swallowed(hook)
        if isinstance(main, str):
            import importlib

            main = importlib.import_module(main).main
        code = main(argv)
        raise_if_interrupted()
        return code
    except KeyboardInterrupt as e:
        _reporting[0] = True
        return _report_interrupt(isinstance(e, Terminated))
    except (EntrepError, OSError) as e:
        _reporting[0] = True
        if _received:  # an error on the way out of an interruption: the interruption is what happened
            return _report_interrupt(_received[-1] == signal.SIGTERM)
        if isinstance(e, EntrepError):
            print_error(str(e))
        else:  # a full disk, a read-only or unwritable folder, a file gone: one line naming the path
            from entrep.io import describe_os_error

            print_error(describe_os_error(e))
        return 2
    finally:
        _reporting[0] = True
        for s, handler in before.items():  # an in-process caller (a test, a notebook) gets its own back
            signal.signal(s, handler)
        sys.unraisablehook = hook
        _received.clear()


def _bars(on):
    """The kit's transient progress display on the console `on`: description, bar, done/total, elapsed, ETA."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=on, transient=True)


@contextlib.contextmanager
def progress(description: str, total: int | None, enabled: bool = True):
    """A transient rich bar with an ETA around a loop that can run for minutes; yields `advance(n=1)`.
    `enabled` False (a process other than the main one) or a console that shows no live display
    (rich before 14.1 nests none inside another): a no-op."""
    from rich.errors import LiveError

    bars = _bars(console) if enabled else None
    try:
        if bars is not None:
            bars.start()
    except LiveError:
        bars = None
    task = bars.add_task(description, total=total) if bars is not None else None
    try:
        yield (lambda n=1: bars.advance(task, n)) if bars is not None else (lambda n=1: None)
    finally:
        if bars is not None:
            bars.stop()


class EpochBars:
    """rich progress bars (epochs, and steps of the current epoch) on the main process (`enabled`);
    elsewhere every call does nothing. console None: rich's default console."""

    def __init__(self, console, epochs: int, enabled: bool = True):
        self.bars = None
        if enabled:
            self.bars = _bars(console)
            self.epochs = self.bars.add_task("epochs", total=epochs)

    def __enter__(self):
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc):
        if self.bars is not None:
            self.bars.stop()

    def start_epoch(self, epoch: int, steps: int) -> None:
        if self.bars is not None:
            self.epoch, self.task = epoch, self.bars.add_task(f"epoch {epoch + 1}", total=steps)

    def step(self, img_per_s: float, loss: float) -> None:
        if self.bars is not None:
            self.bars.update(self.task, advance=1, description=f"epoch {self.epoch + 1} {img_per_s:,.0f} img/s "
                                                                f"loss {loss:.3f}")

    def end_epoch(self) -> None:
        if self.bars is not None:
            self.bars.remove_task(self.task)
            self.bars.advance(self.epochs)
