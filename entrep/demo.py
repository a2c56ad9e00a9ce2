"""python -m entrep.demo OUT_DIR [--seed 0] [--size 80] [--cases 220]: see entrep/commands/demo.py."""
import sys

from entrep.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main("entrep.commands.demo"))  # imported inside: Ctrl-C during imports is exit 130
