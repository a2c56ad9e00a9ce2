"""python -m entrep.runs [DIR]: see entrep/commands/runs.py."""
import sys

from entrep.cli import run_main
from entrep.commands.runs import main

if __name__ == "__main__":
    sys.exit(run_main(main))
