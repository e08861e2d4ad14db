"""`python -m colossuslm.train CONFIG... --set k=v`: the entry point torchrun launches."""

import sys

from colossuslm.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
