"""Shim: `python train.py ARGS` == `captioner train ARGS`."""

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
