"""python -m experiments.train ...  is  recur train ...  (see recur/cli.py)."""
import sys

from recur.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
