"""`colossus` command: one subcommand module per capability, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

from colossuslm.errors import ColossusError

# Imported lazily by name so `colossus plan` never pays for torch and a broken optional
# dependency of one command does not take the others down.
COMMANDS = ["train", "sample", "data", "plan", "serve", "chat", "export", "import", "eval", "launch", "checkpoint"]
# Commands whose module is not named after them (`import` is a Python keyword).
MODULES = {"import": "import_hf"}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colossus", description="Train, scale, plan and serve LLMs.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in [only] if only else COMMANDS:
        module_name = f"colossuslm.cli.{MODULES.get(name, name)}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # command not built into this version
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the chosen command's module, so start-up cost is that command's alone.
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
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
