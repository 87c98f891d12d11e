"""Serving a trained model: a continuous-batching engine over the KV cache (engine.py) and an
OpenAI-compatible HTTP API with a chat page (app.py), started by serve.py."""
