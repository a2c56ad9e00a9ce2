"""python -m entrep.ablate --config C.yaml [--data DIR] [--name NAME] [key=value ...]: see entrep/commands/ablate.py."""
import sys

from entrep.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main("entrep.commands.ablate"))  # imported inside: Ctrl-C during imports is exit 130
