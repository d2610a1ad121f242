"""Validation: perplexity (ASSETS.md protocol), agreement with the source, KV bytes per token."""
