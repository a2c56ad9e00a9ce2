"""python -m entrep.preflight --config C.yaml [--data DIR] [key=value ...]: see entrep/commands/preflight.py."""
import sys

from entrep.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main("entrep.commands.preflight"))  # imported inside: Ctrl-C during imports is exit 130
