"""`colossus chat CKPT`: talk to a model in the terminal, in its own chat template (the server's).

CKPT is a checkpoint, a run directory or a Hugging Face model directory.
"""

from __future__ import annotations

import argparse
import sys

from colossuslm.cli._serve_args import (
    PREFIX_CACHING_BLOCK_SIZE,
    add_model_args,
    add_sampling_args,
    load_engine,
    sampling_params,
)

HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D), /help; Ctrl-C stops a reply"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a checkpoint or Hugging Face model directory in the terminal",
        description="Streaming terminal chat in the model's own chat template (ChatML for models trained here). "
        + HELP,
    )
    add_model_args(parser)
    parser.add_argument("--system", default=None, help="system message that opens the conversation")
    add_sampling_args(parser, max_tokens=256, temperature=0.7)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from colossuslm.errors import ColossusError
    from colossuslm.serve.chat_session import ChatSession

    # Blocks short enough to share: each turn re-sends the conversation, and its prefix is cached.
    engine, _ = load_engine(args, max_num_seqs=1, block_size=PREFIX_CACHING_BLOCK_SIZE)
    session = ChatSession(engine, sampling_params(args), system=args.system)
    interactive = sys.stdin.isatty()
    print(f"chatting with {args.checkpoint} in {session.template.description} ({HELP})")
    while True:
        try:
            text = input("you> " if interactive else "")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            session.reset()
            print("(conversation cleared)")
            continue
        if command == "/help":
            print(HELP)
            continue
        dropped = session.dropped_turns
        sys.stdout.write("model> ")
        try:
            for delta in session.send(text):
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except ColossusError as exc:
            sys.stdout.write(f"(error: {exc})")
        sys.stdout.write("\n")
        if session.dropped_turns > dropped:
            print(f"(forgot the {session.dropped_turns - dropped} oldest exchange(s) to fit the context window)")
