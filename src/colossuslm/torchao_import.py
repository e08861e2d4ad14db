"""One place that imports torchao quietly, for the trainer's float8 and the server's int8.

torchao's first import logs warnings about CUDA extensions a CPU build cannot load and about a
deprecated pytree registration. Neither float8 training (torch._scaled_mm) nor int8 weight-only
serving needs them, so those loggers are raised to ERROR for the import only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextmanager
def quiet_torchao_import() -> Iterator[None]:
    """Silence torchao's import-time warnings inside the block; restore the log levels after."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    previous = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, previous):
            log.setLevel(level)
