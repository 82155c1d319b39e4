"""Serving: continuous batching over a paged KV cache, an async engine and an OpenAI-compatible server."""
