"""python submit.py --run runs/NAME [--topk 1] [--out DIR]"""
import sys

from entrep.commands.submit import main

if __name__ == "__main__":
    sys.exit(main())
