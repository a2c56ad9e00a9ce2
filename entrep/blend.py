"""python -m entrep.blend --runs runs/A runs/B [...] --name NAME: see entrep/commands/blend.py."""
import sys

from entrep.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main("entrep.commands.blend"))  # imported inside: Ctrl-C during imports is exit 130
