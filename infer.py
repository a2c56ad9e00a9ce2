"""python infer.py --run runs/NAME --data TEST_DIR [key=value ...]"""
import sys

from entrep.cli import run_main
from entrep.commands.infer import main

if __name__ == "__main__":
    sys.exit(run_main(main))
