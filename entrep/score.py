"""python -m entrep.score --track {cls,i2i,t2i} --submission S.json --truth T.json: see entrep/commands/score.py."""
import sys

from entrep.cli import run_main
from entrep.commands.score import main

if __name__ == "__main__":
    sys.exit(run_main(main))
