"""python -m entrep.score --submission S.json|S.zip --truth T.json|TRUTH_DIR [--track T]: see entrep/commands/score.py."""
import sys

from entrep.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main("entrep.commands.score"))  # imported inside: Ctrl-C during imports is exit 130
