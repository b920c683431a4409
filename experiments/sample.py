"""python -m experiments.sample ...  is  recur sample ...  (see recur/cli.py)."""
import sys

from recur.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
