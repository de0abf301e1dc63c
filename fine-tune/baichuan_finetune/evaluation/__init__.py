"""Scoring a model: batched generation and its text metrics, multiple-choice accuracy, perplexity (used by
the tools and, during training, by its evaluation callbacks)."""
