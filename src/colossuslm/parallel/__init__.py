"""Parallelism applied to an unchanged model from outside: device mesh, FSDP2, TP, EP."""
