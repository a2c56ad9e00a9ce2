"""python infer.py --run runs/NAME --data TEST_DIR [key=value ...]"""
import sys

from entrep.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main("entrep.commands.infer"))  # imported inside: Ctrl-C during imports is exit 130
