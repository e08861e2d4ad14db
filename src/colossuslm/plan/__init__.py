"""Cluster-scale planning: hardware catalogue, cost model, layout search, reliability,
validation against published runs and calibration against real ones.

Nothing in this package imports torch, so `colossus plan` starts fast. Import submodules directly.
"""
