"""Per-request attention for continuous batching on CPU.

transformers' ContinuousBatchingManager packs every request of a forward pass into one row. With `sdpa` it then
attends each query token to the *whole* packed key/value row through a block-diagonal mask: at 32 decoding
requests of ~80 tokens each, every query scores ~2,600 keys of which ~80 are its own, so attention does ~32x the
useful work (and the manager fills a (batch tokens x all cached tokens) mask every step).

`varlen_sdpa` is registered as a transformers attention implementation and does the same computation per request
from the packed row's boundaries (`cu_seq_lens_q` / `cu_seq_lens_k`, which the manager passes anyway): decoding
requests (one query token) as one padded batch, prefill chunks one request at a time with a bottom-right causal
mask. The result is the same attention; only the masked-out work is skipped. When the implementation is not a
known mask-needing one, the manager also stops building its dense mask.
"""

from __future__ import annotations

import itertools
from typing import Any

NAME = "gptd_varlen_sdpa"
# Attention variants this implementation does not do; `supported()` keeps such models on transformers' sdpa.
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "position_bias")
_instances = itertools.count()


class VarlenAttention:
    """One engine's per-request attention. Its state (which layers read the cache directly, the batch-layout
    cache) belongs to that engine: each instance registers under its own name, so two engines in one process
    (tests, a restart) never see each other's cache layout."""

    def __init__(self) -> None:
        self.name = f"{NAME}_{next(_instances)}"
        # layer_idx -> allocator index, for layers whose cache allocator is write-only (enable_direct_reads).
        self.direct_layers: dict[int, int] = {}
        # Index/mask tensors depend only on the batch layout, the same for every layer of one forward pass.
        self._layout_key: Any = None
        self._layout_value: tuple[Any, ...] = ()
        # Every layer of one forward pass gets the same cu_seq_lens tensors: read them (a host sync on GPUs) and
        # derive the layout once per pass, not once per layer. Keyed by the tensors' identity and version, and
        # dropped by new_pass(), which the engine calls before each forward pass.
        self._pass: tuple[Any, ...] | None = None

        self._flat: tuple[Any, ...] | None = None  # (read_index, version, gathered key positions), same pass

    def new_pass(self) -> None:
        self._pass = None
        self._flat = None

    def register(self) -> str:
        from transformers import AttentionInterface

        AttentionInterface.register(self.name, self.__call__)
        return self.name

    def enable_direct_reads(self, cache: Any) -> bool:
        """Let attention gather each request's keys straight from the paged cache (see
        `_cb_internals.make_cache_write_only`); returns whether it applied."""
        from . import _cb_internals

        layers = _cb_internals.make_cache_write_only(cache)
        self.direct_layers = dict(layers or {})
        return layers is not None

    def _layout(self, lq: list[int], lk: list[int], cu_q: list[int], cu_k: list[int], device: Any) -> tuple[Any, ...]:
        import torch

        key = (tuple(lq), tuple(lk), device)
        if self._layout_key == key:
            return self._layout_value
        decode = [i for i, n in enumerate(lq) if n == 1]
        value: tuple[Any, ...] = (None, None, None, [i for i, n in enumerate(lq) if n != 1], False)
        if decode:
            qpos = torch.tensor([cu_q[i] for i in decode])
            lens = torch.tensor([lk[i] for i in decode])
            width = int(lens.max())
            starts = torch.tensor([cu_k[i] for i in decode])
            ar = torch.arange(width)
            valid = ar[None, :] < lens[:, None]  # [n, width]
            # Padding positions point at the request's own first key (always valid) and are masked out.
            idx = torch.where(valid, starts[:, None] + ar[None, :], starts[:, None])
            # A pure decode pass (every row one query token, in order) skips the scatter into `out`; equal key
            # lengths (always at batch 1) need no padding mask, which lets sdpa take its unmasked kernel.
            only_decode = len(decode) == len(lq)
            mask = None if only_decode and bool(valid.all()) else valid[:, None, None, :].to(device)
            value = (qpos.to(device), idx.to(device), mask, value[3], only_decode)
        self._layout_key, self._layout_value = key, value
        return value

    def __call__(
        self,
        module: Any,
        query: Any,  # [1, heads, total q tokens, head_dim]
        key: Any,  # [1, kv heads, total k tokens, head_dim]
        value: Any,
        attention_mask: Any,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[Any, None]:
        import torch
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if cu_q is None or cu_k is None:
            # Only continuous-batching calls pass the packed row's boundaries. Without them the rows of different
            # requests can't be told apart (and transformers builds no mask for this implementation), so silently
            # running plain sdpa could mix requests: fail loudly instead (warm-up fails, the process exits 1).
            raise RuntimeError(
                f"{NAME}: called without cu_seq_lens_q/cu_seq_lens_k; transformers' batching API changed")
        if isinstance(cu_k, dict):
            if len(cu_k) != 1:
                raise NotImplementedError(f"{NAME}: models with several attention layer types are not supported")
            cu_k = next(iter(cu_k.values()))
        unsupported = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
        if unsupported or query.shape[0] != 1:
            raise NotImplementedError(f"{NAME}: unsupported attention arguments {unsupported or ['batch > 1']}")
        # K/V token-major ([tokens, kv heads, dim]: the lean cache update, _cb_internals.make_cache_write_only) or
        # transformers' layout ([1, kv heads, tokens, dim], a view of the same token-major storage).
        if key.dim() == 3:
            kt, vt = key, value
        else:
            kt, vt = key[0].transpose(0, 1), value[0].transpose(0, 1)
        kv_heads = kt.shape[1]
        gqa = query.shape[1] != kv_heads
        cached = self._pass
        if cached is not None and cached[0] is cu_q and cached[1] is cu_k and cached[2] == (cu_q._version,
                                                                                             cu_k._version):
            cq, ck, lq, lk, layout = cached[3:]
        else:
            cq, ck = cu_q.tolist(), cu_k.tolist()
            lq = [b - a for a, b in itertools.pairwise(cq)]
            lk = [b - a for a, b in itertools.pairwise(ck)]
            # One decoding request (batch 1): its keys are the whole packed row, no layout tensors are needed.
            layout = None if lq == [1] else self._layout(lq, lk, cq, ck, query.device)
            self._pass = (cu_q, cu_k, (cu_q._version, cu_k._version), cq, ck, lq, lk, layout)
        q = query[0]  # [heads, tokens, head_dim]
        # With direct reads, K/V are the whole cache and the packed row is read_index into it; otherwise K/V are the
        # packed row itself (the manager's read-back copy, or only new tokens when nothing was cached).
        token_index = None
        group = self.direct_layers.get(getattr(module, "layer_idx", -1))
        if group is not None:
            read_index = kwargs["read_index"][group]
            token_index = read_index if read_index.numel() else None
        if layout is None:  # batch 1, decoding: attend to every key of the row (index_select of whole token rows)
            kd = kt[: lk[0]] if token_index is None else torch.index_select(kt, 0, token_index)
            vd = vt[: lk[0]] if token_index is None else torch.index_select(vt, 0, token_index)
            od = sdpa(q[None], kd.transpose(0, 1)[None], vd.transpose(0, 1)[None], scale=scaling, enable_gqa=gqa)
            return od.transpose(1, 2), None  # [1, 1, heads, head_dim]
        qpos, idx, valid, others, only_decode = layout
        if qpos is not None:
            n, width = idx.shape
            if token_index is None:
                flat = idx.view(-1)
            elif self._flat is not None and self._flat[0] is token_index and self._flat[1] == token_index._version:
                flat = self._flat[2]  # every layer of the pass reads the same cache positions
            else:
                flat = token_index[idx.view(-1)]
                self._flat = (token_index, token_index._version, flat)
            kd = torch.index_select(kt, 0, flat).view(n, width, kv_heads, -1).transpose(1, 2)
            vd = torch.index_select(vt, 0, flat).view(n, width, kv_heads, -1).transpose(1, 2)
            if only_decode:
                od = sdpa(q.transpose(0, 1).unsqueeze(2), kd, vd, attn_mask=valid, scale=scaling, enable_gqa=gqa)
                return od.transpose(1, 2).reshape(1, n, q.shape[0], q.shape[2]), None
        out = torch.empty_like(q)
        if qpos is not None:
            qd = q[:, qpos].transpose(0, 1).unsqueeze(2)  # [n, heads, 1, head_dim]
            od = sdpa(qd, kd, vd, attn_mask=valid, scale=scaling, enable_gqa=gqa)
            out[:, qpos] = od.squeeze(2).transpose(0, 1)
        for i in others:
            if lq[i] == 0:
                continue
            qi = q[None, :, cq[i] : cq[i + 1]]
            if token_index is None:
                ki, vi = kt[ck[i] : ck[i + 1]].transpose(0, 1)[None], vt[ck[i] : ck[i + 1]].transpose(0, 1)[None]
            else:
                rows = token_index[ck[i] : ck[i + 1]]
                ki = torch.index_select(kt, 0, rows).transpose(0, 1)[None]
                vi = torch.index_select(vt, 0, rows).transpose(0, 1)[None]
            if lq[i] == lk[i]:
                oi = sdpa(qi, ki, vi, is_causal=True, scale=scaling, enable_gqa=gqa)
            else:  # a later prefill chunk: query j sits at key position lk - lq + j
                mask = torch.ones(lq[i], lk[i], dtype=torch.bool, device=q.device).tril(lk[i] - lq[i])
                oi = sdpa(qi, ki, vi, attn_mask=mask, scale=scaling, enable_gqa=gqa)
            out[:, cq[i] : cq[i + 1]] = oi[0]
        return out.unsqueeze(0).transpose(1, 2).contiguous(), None


def supported(config: Any) -> bool:
    """Plain full causal attention only: no sliding windows, mixed layer types, soft-capping or sinks."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(cfg, "sliding_window", None) or getattr(cfg, "attn_logit_softcapping", None):
        return False
    layer_types = getattr(cfg, "layer_types", None)
    return not layer_types or all(t == "full_attention" for t in layer_types)
