"""python submit.py --run runs/NAME [--topk 1] [--out DIR]"""
import sys

from entrep.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main("entrep.commands.submit"))  # imported inside: Ctrl-C during imports is exit 130
