"""Embeddings for any loaded model (generation and classification models alike), for `POST /v1/embeddings`.

Pooling: the mean of the last hidden state over the input's tokens, L2-normalised (so cosine similarity is a
dot product, as with OpenAI's embeddings). Each input runs alone (no padding), so a vector depends only on its
input, never on what else is in the request: the same input always gives the same vector.

The forward passes run on their own worker thread, on a *view* of the model: a copy of its module tree that
shares every weight tensor (no extra memory for weights) but has its own config. The generation engine
switches the model's attention implementation to one that only continuous batching can call (see
attention.py); the view keeps the implementation the model was loaded with, so both can run side by side."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
from typing import Any

from .engine import QueueFullError
from .loading import LoadedModel


def shared_weights_view(model: Any) -> Any:
    """A copy of `model`'s modules and config that shares its parameters and buffers (not copied)."""
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


class Embedder:
    def __init__(self, loaded: LoadedModel, max_pending: int = 256):
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self._model = shared_weights_view(loaded.model)
        cfg = loaded.model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.dimensions: int = int(text_cfg.hidden_size)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptd-embed")
        self._pending = 0
        self._max_pending = max_pending

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def vocab_size(self) -> int:
        return len(self.tokenizer)

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """One unit vector per token-id list. Raises QueueFullError when too many requests wait."""
        if self._pending >= self._max_pending:
            raise QueueFullError(f"{self._pending} embedding requests in flight")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._embed, inputs)
        finally:
            self._pending -= 1

    def _embed(self, inputs: list[list[int]]) -> list[list[float]]:
        import torch

        out = []
        with torch.inference_mode():
            for ids in inputs:
                x = torch.tensor([ids], device=self.device)
                mask = torch.ones_like(x)  # unpadded; passing it keeps transformers from guessing padding
                hidden = self._model(input_ids=x, attention_mask=mask, output_hidden_states=True,
                                     use_cache=False).hidden_states[-1]
                pooled = hidden[0].float().mean(dim=0)
                out.append(torch.nn.functional.normalize(pooled, dim=0).tolist())
        return out

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
