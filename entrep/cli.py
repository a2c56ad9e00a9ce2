"""What every command line shares: the parser with `--config` and `key=value` overrides, logging,
the console, progress bars, and `run_main`, which turns the kit's errors into one line."""
from __future__ import annotations

import argparse
import logging
import os
import signal
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


def setup_logging(main_process: bool = True) -> None:
    """The kit's loggers at INFO on the main process; libraries (open_clip logs on the root) at WARNING."""
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


_received: list[int] = []  # the signals run_main's handler has taken, until run_main reports them


def _interrupt(signum, frame):
    _received.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def raise_if_interrupted() -> None:
    """Raise again a Ctrl-C or SIGTERM that was swallowed: Python ignores an exception raised inside a
    __del__ or a gc callback, which is where a signal's handler runs when it lands there. The loops
    that take long (train steps, embedding batches, folds) call this, so no signal is lost."""
    if _received:
        raise Terminated() if _received[-1] == signal.SIGTERM else KeyboardInterrupt()


def run_main(main, argv=None) -> int:
    """Run an entry point; a known user error prints one clear line (no traceback) and exits 2."""
    handled = threading.current_thread() is threading.main_thread()
    before = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)} if handled else {}
    _received.clear()
    try:
        return main(argv)
    except EntrepError as e:
        print_error(str(e))
        return 2
    except OSError as e:  # a full disk, a read-only or unwritable folder, a file gone: one line naming the path
        from entrep.io import describe_os_error

        print_error(describe_os_error(e))
        return 2
    except KeyboardInterrupt as e:
        # every file is written atomically, so what was finished stays finished
        console.print(f"{'terminated (SIGTERM)' if isinstance(e, Terminated) else 'interrupted'}. Finished folds are "
                      f"kept: add train.resume=true to the same train.py command to continue from the first "
                      f"unfinished fold.", highlight=False, soft_wrap=True)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        _received.clear()
        for s, handler in before.items():  # an in-process caller (a test, a notebook) gets its own back
            signal.signal(s, handler)


class EpochBars:
    """rich progress bars (epochs, and steps of the current epoch) on the main process (`enabled`);
    elsewhere every call does nothing. console None: rich's default console."""

    def __init__(self, console, epochs: int, enabled: bool = True):
        self.bars = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=True)
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
