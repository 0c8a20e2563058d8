"""The only module that touches transformers' private continuous-batching internals.

transformers 5.24's ContinuousBatchingManager has no public hooks for what gptd needs: a per-request sampler,
per-step instrumentation, per-request attention reading the paged cache directly, and dropping outputs of
cancelled requests. Everything that reaches into its private attributes is here, and `missing()` lists each
one that a given transformers build lacks, so an upgrade fails tests/runtime/test_engine_internals.py with a
list instead of a mystery deep inside a forward pass. pyproject pins transformers to 5.24.x for this reason.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
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
    ("FullAttentionCacheAllocator", "update"),
    # What attention.py reads from the attention kwargs of a batched forward pass.
    ("PagedAttentionArgs", "cu_seq_lens_q"),
    ("PagedAttentionArgs", "cu_seq_lens_k"),
    ("PagedAttentionArgs", "read_index"),
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
        tokens = choose(scores[0], ids)
        output_ids[0, : tokens.size(0)].copy_(tokens)

    runner._sample = _sample
    bp.logit_processor.do_processing = False


def set_attention(model: Any, name: str) -> None:
    """Switch the model to a registered attention implementation after init_continuous_batching (which accepts only
    its own names) and before the manager starts (which sizes its dense mask by it)."""
    model.config._attn_implementation = name


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
    """Make the paged cache's full-attention allocators write-only: `update` stores the new K/V and returns the
    whole cache tensors (attention.py then gathers each request's keys itself with the batch's `read_index`),
    skipping the manager's read-back copy of every cached token of the batch, per layer, for K and V.
    Returns {layer index: allocator index}, or None (nothing changed) unless every allocator is plain full
    attention."""
    allocators = dict(getattr(cache, "layer_to_allocator", {}))
    if not allocators or any(
        type(a).__name__ != _FULL_ATTENTION_ALLOCATOR or not hasattr(a, "_kv_token_views")
        for a in allocators.values()
    ):
        return None

    def write_only(allocator: Any) -> Any:
        def update(key_states: Any, value_states: Any, layer_idx: int, read_index: Any, write_index: Any) -> Any:
            k_cache, v_cache = allocator._kv_token_views[layer_idx]
            k_cache.index_copy_(0, write_index, key_states)
            v_cache.index_copy_(0, write_index, value_states)
            if read_index.numel() == 0:  # nothing cached yet: the new tokens are all there is
                return key_states, value_states
            return k_cache, v_cache

        return update

    for allocator in {id(a): a for a in allocators.values()}.values():
        allocator.update = write_only(allocator)
    return {layer: a.index for layer, a in allocators.items()}
