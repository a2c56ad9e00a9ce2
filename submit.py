"""python submit.py --run runs/NAME [--topk 1] [--out DIR]"""
import sys

from entrep.cli import run_main
from entrep.commands.submit import main

if __name__ == "__main__":
    sys.exit(run_main(main))
