"""gptd runtime: an OpenAI-compatible (and KServe v2) model server with continuous batching."""

__version__ = "0.1.0"
