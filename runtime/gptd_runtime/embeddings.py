"""Embeddings for any loaded model (generation and classification models alike), for `POST /v1/embeddings`.

Pooling: the mean of the last hidden state over the input's tokens, L2-normalised (so cosine similarity is a
dot product, as with OpenAI's embeddings). The inputs of one request run as padded batches (sorted by length, so
little padding; right padding with an attention mask, so no real token sees a pad token and positions are
unchanged): a vector equals the one its input gets alone up to floating-point summation order (~1e-7), and the
same request always gives the same vectors.

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

# One forward pass embeds at most this many (padded) tokens, or this many inputs.
BATCH_TOKENS = 8192
BATCH_INPUTS = 64


def padded_batches(lengths: list[int], max_tokens: int = BATCH_TOKENS, max_inputs: int = BATCH_INPUTS,
                   ) -> list[list[int]]:
    """Pure: input indices grouped into batches, shortest first, each within ``max_inputs`` inputs and
    ``max_tokens`` tokens once padded to its longest input (an input longer than that runs alone)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        last = batches[-1] if batches else None
        # Sorted ascending: input i is the longest of the batch it joins.
        if last is not None and len(last) < max_inputs and (len(last) + 1) * lengths[i] <= max_tokens:
            last.append(i)
        else:
            batches.append([i])
    return batches


def shared_weights_view(model: Any) -> Any:
    """A copy of `model`'s modules and config that shares its parameters and buffers (not copied)."""
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


def base_model(model: Any) -> Any:
    """The model without its task head (``model.base_model``: GPT-2's ``transformer``, Llama's ``model``); its
    ``last_hidden_state`` is the last entry of the full model's ``hidden_states`` (after the final norm)."""
    base = getattr(model, "base_model", model)
    return base if base is not None else model


class Embedder:
    def __init__(self, loaded: LoadedModel, max_pending: int = 256):
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        # The base model (transformer blocks + final norm), never the task head: an LM head would turn every padded
        # token into a vocab-wide row of logits (GPT-2 fp32 at BATCH_TOKENS: ~1.65 GB) only to be thrown away.
        self._view = shared_weights_view(loaded.model)
        self._model = base_model(self._view)
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

        out: list[list[float]] = [[] for _ in inputs]
        with torch.inference_mode():
            for batch in padded_batches([len(ids) for ids in inputs], BATCH_TOKENS, BATCH_INPUTS):
                width = max(len(inputs[i]) for i in batch)
                x = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for row, i in enumerate(batch):
                    x[row, : len(inputs[i])] = torch.tensor(inputs[i])
                    mask[row, : len(inputs[i])] = 1
                x, mask = x.to(self.device), mask.to(self.device)
                hidden = self._model(input_ids=x, attention_mask=mask, use_cache=False).last_hidden_state.float()
                weights = mask.unsqueeze(-1).float()
                pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
                vectors = torch.nn.functional.normalize(pooled, dim=-1).tolist()
                for row, i in enumerate(batch):
                    out[i] = vectors[row]
        return out

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
