"""Measuring a model: loss, perplexity and bits per byte on text (`perplexity`), and
lm-evaluation-harness tasks through the `colossus` model class (`harness`). Both score with
`scoring.score_sequences`, the model's own forward; the serving API's logprobs give the same numbers."""
