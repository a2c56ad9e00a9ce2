"""Progress and logs: a bar with an ETA around long loops (a no-op off the main process), one logging
setup for the command lines and the library calls, and each train.py call timed from its own start."""
import logging
import time

import pytest
from rich.console import Console

from entrep import cli


def test_the_progress_bar_shows_an_eta_and_is_a_no_op_where_disabled(monkeypatch):
    seen = Console(record=True, force_terminal=True, width=120)
    monkeypatch.setattr(cli, "console", seen)
    with cli.progress("embedding", 4) as advance:
        for _ in range(4):
            advance()
            time.sleep(0.01)
    shown = seen.export_text()
    assert "embedding" in shown and "4/4" in shown and "eta" in shown
    with cli.progress("embedding", 4, enabled=False) as advance:
        advance()  # nothing shown, nothing raised
    assert seen.export_text() == ""


def test_library_calls_log_like_the_commands_in_a_fresh_process_and_keep_a_callers_logging():
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("entrep").level
    try:
        root.handlers = []
        cli.setup_logging(library=True)  # a fresh process: the commands' rich handler, the kit at INFO
        assert any(type(h).__name__ == "RichHandler" for h in root.handlers)
        assert logging.getLogger("entrep").getEffectiveLevel() == logging.INFO
        mine = logging.StreamHandler()
        root.handlers = [mine]
        logging.getLogger("entrep").setLevel(logging.WARNING)
        cli.setup_logging(library=True)  # the caller's own logging: kept, the kit's lines at INFO through it
        assert root.handlers == [mine] and logging.getLogger("entrep").getEffectiveLevel() == logging.INFO
    finally:
        root.handlers, _, _ = saved
        root.setLevel(saved[1])
        logging.getLogger("entrep").setLevel(saved[2])


def test_a_later_train_call_in_one_process_starts_its_clock_at_its_own_start(monkeypatch):
    """The ablation ladder runs every rung in one process: rung k's start-up is its own, not the k-1 rungs before."""
    import psutil

    from entrep.commands import train

    monkeypatch.setattr(train, "_calls", [0])
    first = train.call_started()
    assert first == pytest.approx(psutil.Process().create_time())
    later = train.call_started()
    assert later == pytest.approx(time.time(), abs=1.0) and later > first


def test_a_ctrl_c_while_a_command_imports_is_the_same_clean_exit_as_one_later(tmp_path, monkeypatch, capsys):
    """The shims name their command module and run_main imports it under its handlers: a Ctrl-C 0.3 s
    into submit.py (inside pandas' import) was a KeyboardInterrupt traceback."""
    (tmp_path / "slow_import_cmd.py").write_text("raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.run_main("slow_import_cmd", []) == 130
    assert "interrupted" in capsys.readouterr().out
