"""accelerate launch train.py --config configs/entrep_vitb16.yaml [--data DIR] [--name NAME] [key=value ...]"""
import sys

from entrep.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main("entrep.commands.train"))  # imported inside: Ctrl-C during imports is exit 130
