"""Data pipeline: byte-level BPE tokenizer, `prepare` (text -> binary token shards + manifest),
shard integrity checks, the streaming `TokenLoader`, and the embedded default corpus.

Modules are imported by their full names (`colossuslm.data.prepare`, `...loader`, ...) rather than
re-exported here: prepare's worker processes import this package, and must not pay for torch.
"""
