"""Inference: checkpoint loading, paged KV cache, continuous-batching engine, OpenAI-style HTTP API,
and Hugging Face export.

The engine (`engine.LLMEngine`, `async_engine.AsyncEngine`) knows nothing of HTTP or terminals; the
entrypoints (`api`, and `colossuslm.cli.{serve,chat,sample}`) are thin layers over it, as in vLLM.
"""
