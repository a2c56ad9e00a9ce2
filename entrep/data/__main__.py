"""python -m entrep.data check DIR [--config C.yaml] [--test TEST_DIR]: see entrep/commands/check.py."""
import sys

from entrep.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main("entrep.commands.check"))  # imported inside: Ctrl-C during imports is exit 130
