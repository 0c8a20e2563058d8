"""The only module that touches transformers' private continuous-batching internals.

transformers 5.24's ContinuousBatchingManager has no public hooks for what gptd needs: a per-request sampler,
per-step instrumentation, per-request attention reading the paged cache directly, and dropping outputs of
cancelled requests. Everything that reaches into its private attributes is here, and `missing()` lists each
one that a given transformers build lacks, so an upgrade fails tests/runtime/test_engine_internals.py with a
list instead of a mystery deep inside a forward pass. pyproject pins transformers to 5.24.x for this reason.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

# (where, attribute) pairs gptd relies on. "where" names the object as the manager exposes it at run time.
INTERNALS: tuple[tuple[str, str], ...] = (
    ("ContinuousBatchingManager", "_generation_step"),
    ("ContinuousBatchingManager", "batch_processor"),
    ("ContinuousBatchingManager", "output_router"),
    ("ContinuousBatchingManager", "background_thread_status"),
    ("OutputRouter", "output_queue"),
    ("OutputRouter", "result_handlers"),
    ("OutputRouter", "_lock"),
    ("BackgroundThreadStatus", "fatal_error"),
    ("ContinuousBatchProcessor", "inputs_and_outputs"),
    ("ContinuousBatchProcessor", "model_runner"),
    ("ContinuousBatchProcessor", "scheduler"),
    ("ContinuousBatchProcessor", "cache"),
    ("ContinuousBatchProcessor", "logit_processor"),
    ("ContinuousBatchingLogitsProcessorList", "do_processing"),
    ("ContinuousBatchingIOs", "requests_in_batch"),
    ("ContinuousBatchingIOs", "num_request_in_batch"),
    ("FutureRequestState", "state"),
    ("FutureRequestState", "has_new_token"),
    ("RequestState", "request_id"),
    ("ModelRunner", "_sample"),
    ("Scheduler", "active_requests"),
    ("PagedAttentionCache", "layer_to_allocator"),
    ("FullAttentionCacheAllocator", "_kv_token_views"),
    ("FullAttentionCacheAllocator", "index"),
    ("PagedAttentionCache", "update"),
    # What place_kv_per_layer re-points at per-layer storage (and the names it swaps while the cache is built).
    ("FullAttentionCacheAllocator", "_kv_page_views"),
    ("FullAttentionCacheAllocator", "_copy_view"),
    ("FullAttentionCacheAllocator", "block_physical_stride"),
    ("FullAttentionCacheAllocator", "write_trash_index"),
    ("FullAttentionCacheAllocator", "blocks_per_sector"),
    ("FullAttentionCacheAllocator", "copy_blocks"),
    ("ContinuousBatchingManager", "_create_batch_processor"),
    ("continuous_api module", "PagedAttentionCache"),
    ("cache module", "PagedAttentionMemoryHandler"),
    # What attention.py reads from the attention kwargs of a batched forward pass.
    ("PagedAttentionArgs", "cu_seq_lens_q"),
    ("PagedAttentionArgs", "cu_seq_lens_k"),
    ("PagedAttentionArgs", "read_index"),
    ("PagedAttentionArgs", "write_index"),
    ("PagedAttentionArgs", "max_length_k"),
    ("PagedAttentionArgs", "block_table"),
    ("FullAttentionCacheAllocator", "layer_type"),
    # Skipped per forward pass by skip_padding_check.
    ("PreTrainedModel", "warn_if_padding_and_no_attention_mask"),
    # The model config's attention implementation, switched after init_continuous_batching (set_attention).
    ("PretrainedConfig", "_attn_implementation"),
)

_FULL_ATTENTION_ALLOCATOR = "FullAttentionCacheAllocator"


def _objects(manager: Any) -> dict[str, Any]:
    """The live object behind each name in INTERNALS (the batch processor exists once the loop has run)."""
    objs: dict[str, Any] = {"ContinuousBatchingManager": manager}
    router = getattr(manager, "output_router", None)
    objs["OutputRouter"] = router
    objs["BackgroundThreadStatus"] = getattr(manager, "background_thread_status", None)
    bp = getattr(manager, "batch_processor", None)
    objs["ContinuousBatchProcessor"] = bp
    ios = getattr(bp, "inputs_and_outputs", None)
    objs["ContinuousBatchingIOs"] = ios
    objs["ModelRunner"] = getattr(bp, "model_runner", None)
    objs["Scheduler"] = getattr(bp, "scheduler", None)
    cache = getattr(bp, "cache", None)
    objs["PagedAttentionCache"] = cache
    allocators = list(getattr(cache, "layer_to_allocator", {}).values())
    objs["FullAttentionCacheAllocator"] = next(
        (a for a in allocators if type(a).__name__ == _FULL_ATTENTION_ALLOCATOR), None)
    objs["ContinuousBatchingLogitsProcessorList"] = getattr(bp, "logit_processor", None)
    from transformers.generation.continuous_batching.input_outputs import PagedAttentionArgs
    from transformers.generation.continuous_batching.requests import FutureRequestState, RequestState

    objs["FutureRequestState"] = FutureRequestState
    objs["RequestState"] = RequestState
    objs["PagedAttentionArgs"] = PagedAttentionArgs
    objs["PretrainedConfig"] = getattr(bp, "config", None)  # the model's own config instance
    from transformers import PreTrainedModel

    objs["PreTrainedModel"] = PreTrainedModel
    from transformers.generation.continuous_batching import cache as cache_module
    from transformers.generation.continuous_batching import continuous_api

    objs["continuous_api module"] = continuous_api
    objs["cache module"] = cache_module
    return objs


def missing(manager: Any) -> list[str]:
    """Every internal of INTERNALS absent from this manager (call after it has run one request)."""
    objs = _objects(manager)
    out = []
    for where, attr in INTERNALS:
        obj = objs.get(where)
        if obj is None:
            out.append(f"{where} (object not found)")
        elif attr in getattr(obj, "__slots__", ()) or hasattr(obj, attr) or attr in getattr(obj, "__annotations__", {}):
            continue
        else:
            out.append(f"{where}.{attr}")
    return out


# -- the per-step hook --------------------------------------------------------------------------------------------
def wrap_step(manager: Any, before: Callable[[Any], None]) -> None:
    """Run ``before(batch_processor)`` ahead of every forward pass (on the manager's thread), and afterwards drop
    outputs that reached the shared queue because their request's handler was already removed (a cancelled
    request): nobody reads that queue, so it would grow forever."""
    step = manager._generation_step
    router = manager.output_router

    def instrumented_step() -> None:
        before(manager.batch_processor)
        step()
        try:
            while True:
                router.output_queue.get_nowait()
        except queue.Empty:
            pass

    manager._generation_step = instrumented_step


def batch_size(bp: Any) -> int:
    return bp.inputs_and_outputs.num_request_in_batch


def cache_of(bp: Any) -> Any:
    """The batch processor's PagedAttentionCache (what attention.VarlenAttention reads directly)."""
    return bp.cache


def sampled_request_ids(bp: Any) -> list[str]:
    """Request ids of the logits rows of this forward pass, in row order: the requests of the batch that get a new
    token (a request in the middle of a chunked prefill has no row)."""
    return [fs.state.request_id for fs in bp.inputs_and_outputs.requests_in_batch if fs.has_new_token]


def install_sampler(bp: Any, choose: Callable[[Any, list[str]], Any]) -> None:
    """Replace the model runner's sampling: ``choose(logits [rows, vocab], request_ids) -> token ids [rows]``.
    transformers' logits processors are off (gptd's sampler does temperature/top-p itself, per request)."""
    runner = bp.model_runner
    ios = bp.inputs_and_outputs

    def _sample(scores: Any, output_ids: Any) -> None:
        ids = [fs.state.request_id for fs in ios.requests_in_batch if fs.has_new_token]
        # The logits hold one row per request of the batch (input_outputs.py get_model_kwargs slices
        # logits_indices[:num_sequences]); the rows of requests with a new token come first, in batch order, and a
        # request in the middle of a chunked prefill leaves a trailing row of padding (logits index 0).
        tokens = choose(scores[0, : len(ids)], ids)
        output_ids[0, : tokens.size(0)].copy_(tokens)

    runner._sample = _sample
    bp.logit_processor.do_processing = False


def set_attention(model: Any, name: str) -> None:
    """Switch the model to a registered attention implementation after init_continuous_batching (which accepts only
    its own names) and before the manager starts (which sizes its dense mask by it)."""
    model.config._attn_implementation = name


def skip_padding_check(model: Any) -> int:
    """Turn off, on this model's instances, the check that every forward pass without an attention mask makes
    (PreTrainedModel.warn_if_padding_and_no_attention_mask: `pad_token_id in input_ids[:, [-1, 0]]`, a tensor
    op and a host sync, ~3 % of a batch-1 step on CPU, a stall per step on GPUs) only to warn once. Continuous
    batching packs requests into one row without padding and passes no mask by design. Returns how many
    modules were changed."""
    changed = 0
    for module in model.modules():
        if hasattr(module, "warn_if_padding_and_no_attention_mask"):
            module.warn_if_padding_and_no_attention_mask = _no_padding_warning
            changed += 1
    return changed


def _no_padding_warning(*_args: Any, **_kwargs: Any) -> None:
    return None


def attention_implementation(model: Any) -> str:
    return model.config._attn_implementation


def active_requests(manager: Any) -> int:
    bp = getattr(manager, "batch_processor", None)
    return 0 if bp is None else len(bp.scheduler.active_requests)


def fatal_error(manager: Any) -> Exception | None:
    return manager.background_thread_status.fatal_error


def forget_handler(manager: Any, request_id: str) -> None:
    router = manager.output_router
    with router._lock:
        router.result_handlers.pop(request_id, None)


def make_cache_write_only(cache: Any) -> dict[int, int] | None:
    """Make the paged cache write-only for gptd's attention: its `update` stores the new K/V and returns the whole
    cache tensors token-major ([rows, kv heads, dim]; attention.py then gathers each request's keys itself with
    the batch's `read_index`), skipping the manager's read-back copy of every cached token of the batch, per
    layer, for K and V, and the squeeze/transpose round trips of transformers' update (PagedAttentionCache.update
    reshapes to token-major and back; attention.py would reshape again). Returns {layer index: allocator index},
    or None (nothing changed) unless every allocator is plain full attention."""
    import torch

    allocators = dict(getattr(cache, "layer_to_allocator", {}))
    if not allocators or any(
        type(a).__name__ != _FULL_ATTENTION_ALLOCATOR or not hasattr(a, "_kv_token_views")
        for a in allocators.values()
    ):
        return None

    def update(key_states: Any, value_states: Any, layer_idx: int, kwargs: dict[str, Any]) -> Any:
        allocator = allocators[layer_idx]
        # What transformers' update sets for the attention call: this layer type's key lengths.
        cu_k = kwargs["cu_seq_lens_k"][allocator.layer_type]
        kwargs["cu_seq_lens_k"] = cu_k if cu_k.dtype == torch.int32 else cu_k.to(torch.int32)
        kwargs["max_length_k"] = kwargs["max_length_k"][allocator.layer_type]
        if kwargs.get("block_table") is not None:  # flash kernels' decode path: never with gptd's attention
            raise RuntimeError("gptd attention: unexpected block-table batch")
        k_cache, v_cache = allocator._kv_token_views[layer_idx]
        k, v = key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)  # [new tokens, kv heads, dim]
        write_index = kwargs["write_index"][allocator.index]
        k_cache.index_copy_(0, write_index, k)
        v_cache.index_copy_(0, write_index, v)
        if kwargs["read_index"][allocator.index].numel() == 0:  # nothing cached yet: the new tokens are all there is
            return k, v
        return k_cache, v_cache

    cache.update = update
    return {layer: a.index for layer, a in allocators.items()}


# -- the KV cache of a model split over several devices -----------------------------------------------------------
# transformers 5.24 builds the paged cache as ONE flat tensor on model.device (continuous_batching/cache.py,
# PagedAttentionCache.__init__: `torch.zeros(..., device=self.device)`, device=self.model.device in
# continuous_api.py ContinuousBatchingManager._create_batch_processor), and each full-attention allocator slices
# every layer's K/V pages out of it (cache_allocators/full_attention.py register_cache_tensor). A model split over
# GPUs by device_map="auto" then writes layer N's keys, computed on its GPU, into a tensor on the first GPU: the
# index_copy_ fails across devices. No per-layer device map exists there (no `layer_device_map`; only tensor
# parallelism, which shards heads, not layers). place_kv_per_layer is the adaptation.
_CACHE_BUILD = threading.Lock()  # the cache is built with two module names of transformers swapped (below)


def place_kv_per_layer(manager: Any, layer_devices: Sequence[str]) -> None:
    """Give every layer its own K and V tensors on that layer's device (``layer_devices[layer_idx]``), in place
    of the one flat cache tensor on the first device. Call before the manager starts.

    The manager builds its cache on its own thread; this wraps that build so the flat tensor is made on the
    ``meta`` device (no memory) and the memory check counts the free memory of every device holding layers,
    then re-points each allocator at per-layer storage (shard_cache). Requests, block tables, prefix sharing and
    the scheduler are untouched: only where a block's bytes live changes."""
    create = manager._create_batch_processor
    devices = list(layer_devices)

    def create_with_layer_kv() -> Any:
        from transformers.generation.continuous_batching import cache as cache_module
        from transformers.generation.continuous_batching import continuous_api

        cache_cls = continuous_api.PagedAttentionCache
        handler_cls = cache_module.PagedAttentionMemoryHandler

        EveryDeviceMemory = every_device_memory_handler(handler_cls, devices)

        def build(**kwargs: Any) -> Any:
            home = kwargs["device"]
            cache = cache_cls(**{**kwargs, "device": "meta"})
            shard_cache(cache, devices)
            cache.device = home
            return cache

        # The swapped names are module globals, seen by every thread: only this thread (the one building this
        # manager's cache) gets the per-layer build; a cache built meanwhile on another thread (another
        # manager, unsharded) gets transformers' own classes.
        owner = threading.get_ident()

        def cache_for_thread(*args: Any, **kwargs: Any) -> Any:
            return build(**kwargs) if threading.get_ident() == owner else cache_cls(*args, **kwargs)

        def memory_for_thread(*args: Any, **kwargs: Any) -> Any:
            cls = EveryDeviceMemory if threading.get_ident() == owner else handler_cls
            return cls(*args, **kwargs)

        with _CACHE_BUILD:
            continuous_api.PagedAttentionCache = cache_for_thread
            cache_module.PagedAttentionMemoryHandler = memory_for_thread
            try:
                return create()
            finally:
                continuous_api.PagedAttentionCache = cache_cls
                cache_module.PagedAttentionMemoryHandler = handler_cls

    manager._create_batch_processor = create_with_layer_kv


def every_device_memory_handler(handler_cls: Any, devices: Sequence[str]) -> Any:
    """transformers' PagedAttentionMemoryHandler for a cache split by layers over ``devices`` (one per layer).

    Its sizing adds every term against one figure; here that figure is the free memory of all the GPUs
    (available_memory), and the result is then checked device by device (sectors_fitting): each GPU holds its
    layers' share of the cache, and every term that is not cache storage (IO tensors, the activation / LM-head
    peak, the read-back of cached K/V, the trash sectors, the dense attention mask that accelerate's hooks move to
    each layer's device) is charged to *every* GPU, since each may hold it at its peak. A configured size that
    does not fit raises MemoryError naming the GPU; a size inferred from memory shrinks to fit."""

    class EveryDeviceMemory(handler_cls):  # type: ignore[misc, valid-type]
        def get_available_memory(self) -> int:
            return available_memory(devices, self.cb_config.max_memory_percent,
                                    lambda: handler_cls.get_available_memory(self))

        def infer_max_batch_tokens_and_num_sectors(self) -> tuple[int, int]:
            max_batch_tokens, num_sectors = super().infer_max_batch_tokens_and_num_sectors()
            free = free_by_device(devices, self.cb_config.max_memory_percent)
            if not free:
                return max_batch_tokens, num_sectors
            mask0 = self.attention_mask_bytes(max_batch_tokens, 0)
            fit, tightest = sectors_fitting(
                free, layer_shares(devices),
                everywhere=self.fixed_overhead_bytes + max_batch_tokens * self.bytes_per_batch_token + mask0,
                per_sector_everywhere=self.tokens_per_sector * self.bytes_per_cache_token
                + self.attention_mask_bytes(max_batch_tokens, 1) - mask0,
                per_sector_storage=self.bytes_per_sector)
            if fit >= num_sectors:
                return max_batch_tokens, num_sectors
            if self.num_sectors_from_config() is not None or fit <= 0:
                raise MemoryError(
                    f"the KV cache ({num_sectors} sectors) and batch tensors do not fit on {tightest} "
                    f"({free[tightest] // 2**20} MiB usable): at most {max(fit, 0)} sectors fit there; "
                    "lower GPTD_KV_CACHE_BLOCKS or GPTD_MAX_BATCH_TOKENS")
            return max_batch_tokens, fit

    return EveryDeviceMemory


def layer_shares(devices: Sequence[str]) -> dict[str, float]:
    """Pure: the fraction of the layers (and so of the KV cache) each device holds."""
    return {d: devices.count(d) / len(devices) for d in dict.fromkeys(devices)}


def free_by_device(devices: Sequence[str], fraction: float) -> dict[str, int]:
    """Usable free memory (``fraction`` of what is free) of every distinct CUDA device of ``devices``; empty
    when there is none (or no CUDA)."""
    import torch

    cuda = sorted({d for d in devices if d.startswith("cuda")})
    if not cuda or not torch.cuda.is_available():
        return {}
    return {d: int(torch.cuda.mem_get_info(torch.device(d))[0] * fraction) for d in cuda}


def sectors_fitting(free: dict[str, int], shares: dict[str, float], *, everywhere: int,
                    per_sector_everywhere: int, per_sector_storage: int) -> tuple[int, str]:
    """Pure: the most cache sectors S such that on every device d of ``free``
    ``everywhere + S * (per_sector_everywhere + shares[d] * per_sector_storage) <= free[d]``, and the device
    that bounds it."""
    best: tuple[int, str] | None = None
    for d, room in free.items():
        cost = per_sector_everywhere + shares.get(d, 0.0) * per_sector_storage
        fit = int((room - everywhere) // cost) if cost > 0 else 2**62
        if best is None or fit < best[0]:
            best = (fit, d)
    assert best is not None
    return best


def available_memory(devices: Sequence[str], fraction: float, default: Callable[[], int]) -> int:
    """Free memory over every distinct CUDA device of ``devices`` (transformers looks at the current GPU only);
    ``default()`` (transformers' own figure) elsewhere."""
    import torch

    cuda = sorted({d for d in devices if d.startswith("cuda")})
    if not cuda or not torch.cuda.is_available():
        return default()
    return int(sum(torch.cuda.mem_get_info(torch.device(d))[0] for d in cuda) * fraction)


def shard_cache(cache: Any, layer_devices: Sequence[str]) -> dict[int, str]:
    """Re-point every full-attention allocator of ``cache`` at per-layer K and V tensors, each on
    ``layer_devices[layer_idx]``; returns {layer index: device}. The flat tensor is dropped.

    Block b of a layer lives at rows [b * page, (b + 1) * page) of that layer's K (and V) tensor. The allocator
    turns (block, offset) into a row as ``block * block_physical_stride + offset``, so setting the stride to
    the page size makes its read/write indices address the per-layer tensors directly: no per-step remapping.
    The write-trash row (first row of sector 1) moves with the stride; the read-trash row 0 stays zeroed."""
    import torch

    allocators = {id(a): a for a in cache.layer_to_allocator.values()}.values()
    wrong = sorted({type(a).__name__ for a in allocators} - {_FULL_ATTENTION_ALLOCATOR})
    if wrong:
        raise NotImplementedError(f"the KV cache of {', '.join(wrong)} layers cannot be split over devices")
    placed: dict[int, str] = {}
    for a in allocators:
        page = a.tokens_per_page
        # The flat view spans the two trash sectors too: (pages in the tensor) / (pages per block) blocks.
        blocks = a.cache_tensor.shape[0] // page // a.pages_per_block
        shape = (blocks * page, a.num_key_value_heads, a.head_dim)
        views: dict[int, tuple[Any, Any]] = {}
        for layer in a.layer_indices:
            device = torch.device(layer_devices[layer])
            views[layer] = (torch.zeros(shape, dtype=a.cache_dtype, device=device),
                            torch.zeros(shape, dtype=a.cache_dtype, device=device))
            placed[layer] = str(device)
        a._kv_token_views = views
        a._kv_page_views = {i: (k.view(blocks, page, *shape[1:]), v.view(blocks, page, *shape[1:]))
                            for i, (k, v) in views.items()}
        a.block_physical_stride = page
        a.write_trash_index = page * a.blocks_per_sector
        a.copy_blocks = _per_layer_copy(a)
        a.cache_tensor = None  # the flat tensor (and its memory, if it had any) is gone
        del a._copy_view  # CPU offloading copies whole flat blocks: it must fail loudly, not copy the wrong bytes
    cache.cache_tensor = None
    return placed


def _per_layer_copy(allocator: Any) -> Callable[[list[int], list[int]], None]:
    """copy_blocks (forking a request's cache) for per-layer storage: the same block ids in every layer's pages."""
    import torch

    def copy_blocks(source_block_ids: list[int], dest_block_ids: list[int]) -> None:
        for k_pages, v_pages in allocator._kv_page_views.values():
            src = torch.tensor(source_block_ids, device=k_pages.device, dtype=torch.long)
            dst = torch.tensor(dest_block_ids, device=k_pages.device, dtype=torch.long)
            k_pages.index_copy_(0, dst, k_pages.index_select(0, src))
            v_pages.index_copy_(0, dst, v_pages.index_select(0, src))

    return copy_blocks
