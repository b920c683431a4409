"""python -m experiments.eval ...  is  recur eval ...  (see recur/cli.py)."""
import sys

from recur.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
