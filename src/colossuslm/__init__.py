"""Colossus LM: train, scale, plan and serve decoder-only language models."""

__version__ = "0.1.0"
