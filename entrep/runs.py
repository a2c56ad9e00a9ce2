"""python -m entrep.runs [DIR]: see entrep/commands/runs.py."""
import sys

from entrep.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main("entrep.commands.runs"))  # imported inside: Ctrl-C during imports is exit 130
