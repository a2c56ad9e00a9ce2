"""python -m entrep.report RUN [...]: see entrep/commands/report.py."""
import sys

from entrep.cli import run_main
from entrep.commands.report import main

if __name__ == "__main__":
    sys.exit(run_main(main))
