"""Shim: `python generate.py IMAGES --model DIR` == `captioner caption IMAGES --model DIR`."""

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["caption", *sys.argv[1:]]))
