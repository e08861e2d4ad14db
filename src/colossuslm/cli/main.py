"""`colossus` command: one subcommand module per capability, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

from colossuslm.errors import ColossusError

# Imported lazily by name so `colossus plan` never pays for torch and a broken optional
# dependency of one command does not take the others down.
COMMANDS = ["train", "sample", "data", "plan", "serve", "chat", "export", "launch", "checkpoint"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colossus", description=__doc__.split(":")[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"colossuslm.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"colossuslm.cli.{name}":
                continue  # command not built into this version
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The command name decides which module to import; build only what is needed for speed.
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except ColossusError as exc:
        print(f"colossus {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
