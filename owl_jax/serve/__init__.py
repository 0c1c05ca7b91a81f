"""Serving: an HTTP API in OpenAI's chat-completions style (`openai_api`) over a batcher that decodes
requests arriving together in one batch (`batcher`); `python -m owl_jax.serve` runs it (the `serve`
extra: FastAPI and uvicorn)."""
