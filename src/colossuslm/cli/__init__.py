"""Command-line entry points (`colossus ...`, and `python -m colossuslm.train` under torchrun).

Importing this package sets one process-wide allocator default before torch loads: CPU tensors
of 2 MB and more go on transparent huge pages (PyTorch's own switch, read once at torch's first
allocation). Without it every fresh large tensor (the loss's logit chunks, weight gradients, the
feed-forward activations) page-faults 4 KB at a time and the kernel zeroes each page: the `small`
training step on a 2-core CPU spent about a fifth of its time there (13.0 s -> 10.5 s per step).
A value the user set wins.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
