"""`python -m colossuslm.eval.lm_eval ARGS`: lm-evaluation-harness's own command line, with the
`colossus` model class registered and the shipped tasks (colossus_mc, colossus_gen) findable.

    python -m colossuslm.eval.lm_eval --model colossus --model_args path=runs/tiny --tasks colossus_mc

lm-eval discovers models only through its registry, which nothing outside this process can
extend, so the plain `lm_eval` command cannot load `colossus`; everything else is lm-eval's.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from lm_eval.__main__ import cli_evaluate

    from colossuslm.eval import harness  # registers "colossus"

    args = list(sys.argv[1:] if argv is None else argv)
    # lm-eval takes one --include_path: the shipped tasks are added only when the user names none.
    if "--tasks" in args and "--include_path" not in args:
        args += ["--include_path", str(harness.SHIPPED_TASKS)]
    sys.argv = [sys.argv[0], *args]
    return cli_evaluate() or 0


if __name__ == "__main__":
    sys.exit(main())
