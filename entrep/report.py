"""python -m entrep.report RUN [...]: see entrep/commands/report.py."""
import sys

from entrep.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main("entrep.commands.report"))  # imported inside: Ctrl-C during imports is exit 130
