"""Validation: perplexity (the protocol of docs/evaluation.md), agreement with the source, KV bytes per token."""
