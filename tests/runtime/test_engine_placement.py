"""Multi-GPU placement: the decision (which devices, how much weight memory per GPU, which layers where) is pure
and tested here without GPUs; the per-layer KV cache that makes a layer-split model servable
(_cb_internals.place_kv_per_layer) is tested on CPU: each layer's K/V tensors are made on the device named for
that layer, and generation with per-layer storage gives exactly the tokens of transformers' own flat cache.

What cannot run here (no GPU on these machines): a real two-GPU model with accelerate moving activations and
the cache indices between devices. That path is the same code with real device names."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from gptd_runtime import _cb_internals
from gptd_runtime.config import Settings
from gptd_runtime.engine import GenerationEngine, SamplingParams
from gptd_runtime.loading import (
    LoadedModel,
    ModelLoadError,
    Placement,
    check_kv_fits,
    decoder_layer_devices,
    describe_layer_devices,
    kv_bytes_by_device,
    load_model,
    offloaded_modules,
    plan_max_memory,
    plan_placement,
    unshardable_attention,
)

GiB = 2**30


# -- the pure decision -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("requested", "gpus"), [("cuda", 2), ("auto", 2), ("cuda", 8)])
def test_several_gpus_in_one_process_shard_by_layers(requested: str, gpus: int) -> None:
    every = tuple(f"cuda:{i}" for i in range(gpus))
    assert plan_placement(requested, gpus) == Placement("cuda:0", every, device_map="auto")


def test_max_memory_leaves_each_gpu_its_kv_share_and_activation_room() -> None:
    budget = plan_max_memory([40 * GiB, 80 * GiB], kv_bytes=10 * GiB)
    # 5 GiB of KV each; activations: 10 % of the GPU (4 and 8 GiB).
    assert budget == {0: 40 * GiB - 5 * GiB - 4 * GiB, 1: 80 * GiB - 5 * GiB - 8 * GiB}
    # Small GPUs keep at least 1 GiB for activations.
    assert plan_max_memory([4 * GiB], kv_bytes=1 * GiB) == {0: 2 * GiB}


def test_max_memory_refuses_a_gpu_without_room_for_weights() -> None:
    with pytest.raises(ModelLoadError, match=r"cuda:1 has 2\.0 GiB free.*GPTD_KV_CACHE_BLOCKS"):
        plan_max_memory([40 * GiB, 2 * GiB], kv_bytes=4 * GiB)


def test_kv_split_follows_the_layers() -> None:
    layers = ("cuda:0",) * 3 + ("cuda:1",) * 5
    assert kv_bytes_by_device(layers, 800) == {"cuda:0": 300, "cuda:1": 500}
    check_kv_fits(layers, 800, {"cuda:0": 300, "cuda:1": 500})
    with pytest.raises(ModelLoadError, match="cuda:1 holds 5 layers whose KV cache needs"):
        check_kv_fits(layers, 800 * 2**20, {"cuda:0": 10 * GiB, "cuda:1": 100 * 2**20})


def test_offloaded_modules_are_named() -> None:
    assert offloaded_modules({"transformer.wte": 0, "transformer.h.0": 1, "transformer.h.1": "cpu",
                              "lm_head": "disk"}) == ["lm_head", "transformer.h.1"]
    assert offloaded_modules({"": 0}) == []


def test_only_full_attention_caches_are_split() -> None:
    from transformers import GPT2Config, MistralConfig

    assert unshardable_attention(GPT2Config()) is None
    assert unshardable_attention(MistralConfig(sliding_window=None)) is None
    assert "sliding_attention" in (unshardable_attention(MistralConfig(sliding_window=4096)) or "")


def test_start_up_line_names_the_layers_of_each_device() -> None:
    assert describe_layer_devices(("cuda:0",) * 2 + ("cuda:1",) * 3) == "cuda:0 (layers 0-1), cuda:1 (layers 2-4)"
    assert describe_layer_devices(("cuda:0", "cuda:1")) == "cuda:0 (layer 0), cuda:1 (layer 1)"


def test_decoder_layer_devices_reads_each_layer(models: dict[str, Path]) -> None:
    loaded = load_model(Settings(model=str(models["plain"])), models["plain"])
    model = loaded.model
    n = model.config.n_layer
    assert loaded.layer_devices == ("cpu",) * n and not loaded.sharded
    model.transformer.h[n - 1].to("meta")  # a stand-in for "another device": its weights are elsewhere
    assert decoder_layer_devices(model) == ("cpu",) * (n - 1) + ("meta",)


def test_decoder_layer_devices_reads_the_decoders_layer_list(models: dict[str, Path]) -> None:
    """Another ModuleList of num_hidden_layers modules registered ahead of the decoder's blocks (per-layer adapters,
    say) is not taken for the layers."""
    model = load_model(Settings(model=str(models["plain"])), models["plain"]).model
    n = model.config.n_layer
    adapters = torch.nn.ModuleList(torch.nn.Linear(2, 2, device="meta") for _ in range(n))
    for owner in (model, model.transformer):  # first among the model's modules and among the decoder's
        owner._modules = {"adapters": adapters, **owner._modules}
    assert next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList)) is adapters
    model.transformer.h[0].to("meta")
    assert decoder_layer_devices(model) == ("meta",) + ("cpu",) * (n - 1)


# -- per-layer KV storage ----------------------------------------------------------------------------------------
def _cb_config(**extra: Any) -> Any:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    return ContinuousBatchingConfig(page_size=4, num_blocks=64, max_batch_tokens=64, max_requests_per_batch=8,
                                    use_cuda_graph=False, use_async_batching=False, **extra)


def _manager(model: Any) -> Any:
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=-1, pad_token_id=0)
    return model.init_continuous_batching(generation_config=gen, continuous_batching_config=_cb_config())


def test_each_layer_kv_is_made_on_its_layers_device(models: dict[str, Path]) -> None:
    from transformers.generation.continuous_batching import cache as cache_module
    from transformers.generation.continuous_batching import continuous_api

    model = load_model(Settings(model=str(models["plain"])), models["plain"]).model
    n = model.config.n_layer
    devices = ["cpu" if i % 2 == 0 else "meta" for i in range(n)]  # meta: a second device torch has on CPU
    reference = _manager(model)._create_batch_processor().cache  # transformers' own flat cache, same config
    mgr = _manager(model)
    _cb_internals.place_kv_per_layer(mgr, devices)
    cache = mgr._create_batch_processor().cache
    # The swapped transformers names are restored once the cache is built.
    assert continuous_api.PagedAttentionCache is cache_module.PagedAttentionCache
    assert cache_module.PagedAttentionMemoryHandler.__name__ == "PagedAttentionMemoryHandler"
    assert cache.cache_tensor is None and cache.device == model.device
    (allocator,) = {id(a): a for a in cache.layer_to_allocator.values()}.values()
    per_layer_bytes = 0
    for layer in range(n):
        k, v = allocator._kv_token_views[layer]
        assert str(k.device) == devices[layer] and str(v.device) == devices[layer]
        assert k.untyped_storage().data_ptr() != v.untyped_storage().data_ptr() or k.device.type == "meta"
        per_layer_bytes += k.numel() * k.element_size() + v.numel() * v.element_size()
    # The same capacity as the flat tensor, now spread over the devices.
    assert per_layer_bytes == reference.cache_tensor.numel()
    assert allocator.block_physical_stride == allocator.tokens_per_page
    assert allocator.write_trash_index == allocator.tokens_per_page * allocator.blocks_per_sector


def test_a_cache_built_meanwhile_on_another_thread_is_not_sharded(
        models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """place_kv_per_layer swaps two transformers module names while its cache is built; another manager (no
    per-layer placement) building its cache on another thread at that moment gets transformers' own flat cache."""
    import threading

    from transformers.generation.continuous_batching import continuous_api

    model = load_model(Settings(model=str(models["plain"])), models["plain"]).model
    other_model = load_model(Settings(model=str(models["plain"])), models["plain"]).model
    sharded, plain = _manager(model), _manager(other_model)
    _cb_internals.place_kv_per_layer(sharded, ["meta"] * model.config.n_layer)
    real_cache_cls, real_shard = continuous_api.PagedAttentionCache, _cb_internals.shard_cache
    built: dict[str, Any] = {}

    def shard_with_a_plain_build_meanwhile(cache: Any, devices: Any) -> Any:
        if built:  # a nested call: the plain build was (wrongly) sent here too; don't recurse
            return real_shard(cache, devices)
        built["started"] = True
        assert continuous_api.PagedAttentionCache is not real_cache_cls  # really inside the swap window
        worker = threading.Thread(target=lambda: built.setdefault("plain", plain._create_batch_processor()))
        worker.start()
        worker.join(timeout=30)
        return real_shard(cache, devices)

    monkeypatch.setattr(_cb_internals, "shard_cache", shard_with_a_plain_build_meanwhile)
    bp = sharded._create_batch_processor()
    plain_cache = built["plain"].cache
    assert plain_cache.cache_tensor is not None and plain_cache.cache_tensor.device == other_model.device
    (plain_alloc,) = {id(a): a for a in plain_cache.layer_to_allocator.values()}.values()
    assert plain_alloc._kv_token_views[0][0].device == other_model.device
    assert plain_alloc.block_physical_stride != plain_alloc.tokens_per_page  # the flat layout, not per-layer
    assert bp.cache.cache_tensor is None  # while the sharded manager did get per-layer storage
    (alloc,) = {id(a): a for a in bp.cache.layer_to_allocator.values()}.values()
    assert str(alloc._kv_token_views[0][0].device) == "meta"


def test_a_sliding_window_cache_is_refused() -> None:
    from types import SimpleNamespace

    class SlidingAttentionCacheAllocator:
        pass

    cache = SimpleNamespace(layer_to_allocator={0: SlidingAttentionCacheAllocator()})
    with pytest.raises(NotImplementedError, match="SlidingAttentionCacheAllocator layers cannot be split"):
        _cb_internals.shard_cache(cache, ["cpu"])


PROMPTS = ["The operator reconciles", "a long prompt " * 12, "x", "GPUs and pages and blocks of keys"]


def _generate(model: Any, tokenizer: Any, per_layer: bool) -> list[list[int]]:
    """transformers' own attention (sdpa over the cache read-back, the path a CUDA model takes), greedy."""
    mgr = _manager(model)
    if per_layer:
        _cb_internals.place_kv_per_layer(mgr, ["cpu"] * model.config.n_layer)
    out: dict[str, list[int]] = {}
    with torch.no_grad():
        mgr.start()
        try:
            ids = [mgr.add_request(tokenizer(p).input_ids, request_id=f"r{i}", max_new_tokens=16)
                   for i, p in enumerate(PROMPTS)]
            while len(out) < len(ids):
                result = mgr.get_result(timeout=30)
                assert result is not None and result.error is None, result
                if result.is_finished():
                    out[result.request_id] = list(result.generated_tokens)
        finally:
            mgr.stop(block=True, timeout=10)
    return [out[i] for i in ids]


def test_per_layer_storage_generates_the_same_tokens_as_the_flat_cache(models: dict[str, Path]) -> None:
    loaded = load_model(Settings(model=str(models["plain"])), models["plain"])
    flat = _generate(loaded.model, loaded.tokenizer, per_layer=False)
    assert all(len(t) == 16 for t in flat)
    assert _generate(loaded.model, loaded.tokenizer, per_layer=True) == flat


async def _engine_tokens(models: dict[str, Path], sharded: bool, monkeypatch: pytest.MonkeyPatch,
                         hooks: bool = False) -> list[str]:
    settings = Settings(model=str(models["plain"]), max_new_tokens=40, max_batch_size=8, max_batch_tokens=32,
                        kv_cache_page_size=4)
    loaded = load_model(settings, models["plain"])
    if hooks:  # accelerate's per-module hooks, as device_map="auto" installs them, carry the batch kwargs
        from accelerate import dispatch_model

        model = loaded.model
        device_map = {name: "cpu" for name in ("transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head")}
        device_map |= {f"transformer.h.{i}": "cpu" for i in range(model.config.n_layer)}
        dispatch_model(model, device_map=device_map, force_hooks=True, skip_keys=model._skip_keys_device_placement)
        assert hasattr(model.transformer.h[0], "_hf_hook")
    if sharded:  # every layer "elsewhere": per-layer storage on CPU, through the whole engine path
        monkeypatch.setattr(LoadedModel, "sharded", property(lambda self: True))
    engine = GenerationEngine(loaded, settings)
    engine.start()
    try:
        await engine.warmup()
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        seeded = SamplingParams(max_tokens=40, temperature=1.0, seed=5, ignore_eos=True)
        streams = [engine.submit(engine.tokenizer(p).input_ids, params if i % 2 else seeded)
                   for i, p in enumerate(PROMPTS)]
        texts = [t for t, _ in await asyncio.gather(*(s.collect() for s in streams))]
        if sharded:  # the engine really ran on per-layer storage
            allocator = next(iter(engine._manager.batch_processor.cache.layer_to_allocator.values()))
            assert allocator.block_physical_stride == allocator.tokens_per_page
        return texts
    finally:
        engine.stop()


async def test_engine_on_per_layer_storage_matches_the_flat_cache(
        models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """gptd's own attention (direct cache reads) and sampler, chunked prefill next to decoding rows."""
    flat = await _engine_tokens(models, False, monkeypatch)
    assert await _engine_tokens(models, True, monkeypatch) == flat


async def test_engine_through_accelerate_hooks_matches_the_flat_cache(
        models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The paged-attention kwargs (read/write indices, cu_seq_lens, the cache object) pass through accelerate's
    AlignDevicesHook of every layer, as with a device_map model; here every device is the CPU."""
    flat = await _engine_tokens(models, False, monkeypatch)
    assert await _engine_tokens(models, True, monkeypatch, hooks=True) == flat


# -- load_model's sharded path, with accelerate's placement stood in (no GPU here) ----------------------------------
def _fake_sharded_load(monkeypatch: pytest.MonkeyPatch, hf_device_map: dict[str, Any],
                       meta_layers: tuple[int, ...] = ()) -> list[tuple[Any, ...]]:
    """placement_for says "two GPUs, split by layers"; _load_sharded loads on the CPU and reports the given
    hf_device_map (moving ``meta_layers`` to meta as stand-ins for the second GPU). Returns its calls."""
    from gptd_runtime import loading

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(loading, "placement_for",
                        lambda _: Placement("cuda:0", ("cuda:0", "cuda:1"), device_map="auto"))

    def load(cls: Any, path: Path, dtype: Any, settings: Settings, gpus: int) -> Any:
        calls.append((settings.task, gpus))
        model = cls.from_pretrained(path, dtype=torch.float32)
        for i in meta_layers:
            model.transformer.h[i].to("meta")
        model.hf_device_map = hf_device_map
        return model

    monkeypatch.setattr(loading, "_load_sharded", load)
    monkeypatch.setattr(loading, "_pick_dtype", lambda *_: torch.float32)
    return calls


def test_a_model_offloaded_to_cpu_is_refused(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_sharded_load(monkeypatch, {"transformer.wte": 0, "transformer.h.0": 1, "transformer.h.1": "cpu"})
    with pytest.raises(ModelLoadError, match=r"does not fit on the visible GPUs.*transformer\.h\.1"):
        load_model(Settings(model=str(models["plain"]), device="cuda"), models["plain"])
    assert calls == [("text-generation", 2)]


def test_sharded_load_reports_the_layer_split(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_sharded_load(monkeypatch, {"transformer.h.0": 0, "transformer.h.1": 1}, meta_layers=(1,))
    loaded = load_model(Settings(model=str(models["plain"]), device="cuda"), models["plain"])
    assert loaded.sharded and loaded.layer_devices == ("cpu", "meta") and loaded.devices == ("cpu", "meta")
    assert loaded.describe_devices() == "cpu (layer 0), meta (layer 1)"
    # Classification models are split too (no KV cache to place): never silently one GPU of several.
    cls = load_model(Settings(model=str(models["cls"]), device="cuda", task="text-classification"), models["cls"])
    assert calls == [("text-generation", 2), ("text-classification", 2)] and cls.sharded


# -- memory of several GPUs, with torch.cuda's figures stood in (no GPU here) ------------------------------------
def _fake_gpus(monkeypatch: pytest.MonkeyPatch, free: dict[str, int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free[str(device)], 80 * GiB))


def test_available_memory_sums_each_gpu_once(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gpus(monkeypatch, {"cuda:0": 10 * GiB, "cuda:1": 30 * GiB})
    devices = ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert _cb_internals.available_memory(devices, 0.5, lambda: -1) == 20 * GiB
    assert _cb_internals.free_by_device(devices, 0.5) == {"cuda:0": 5 * GiB, "cuda:1": 15 * GiB}
    assert _cb_internals.available_memory(["cpu", "cpu"], 0.5, lambda: 7) == 7  # transformers' own figure
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _cb_internals.available_memory(devices, 0.5, lambda: 7) == 7 and not _cb_internals.free_by_device(devices, 1)


def test_sectors_fitting_charges_non_cache_terms_to_every_gpu() -> None:
    shares = _cb_internals.layer_shares(["cuda:0"] + ["cuda:1"] * 3)
    assert shares == {"cuda:0": 0.25, "cuda:1": 0.75}
    # cuda:0: (1000 - 200) // (10 + 0.25 * 40) = 40; cuda:1: (3000 - 200) // (10 + 0.75 * 40) = 70.
    fit = _cb_internals.sectors_fitting({"cuda:0": 1000, "cuda:1": 3000}, shares, everywhere=200,
                                        per_sector_everywhere=10, per_sector_storage=40)
    assert fit == (40, "cuda:0")


def _memory_handler(monkeypatch: pytest.MonkeyPatch, free: dict[str, int], num_blocks: int | None) -> Any:
    from transformers import GPT2Config
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.cache import PagedAttentionMemoryHandler

    _fake_gpus(monkeypatch, free)
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=2000)
    page, head_dim = 16, 64
    bytes_per_block = config.n_layer * 2 * config.n_head * head_dim * 2 * page  # K and V, fp16, every layer
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=num_blocks, max_batch_tokens=512,
                                  max_requests_per_batch=8, use_cuda_graph=False, use_async_batching=False,
                                  max_memory_percent=0.9)  # resolved by init_continuous_batching in real use
    cls = _cb_internals.every_device_memory_handler(PagedAttentionMemoryHandler, ["cuda:0"] * 2 + ["cuda:1"] * 2)
    return cls(config=config, cb_config=cb, dtype=torch.float16, bytes_per_sector=bytes_per_block,
               tokens_per_sector=page, bytes_per_block=bytes_per_block, attn_types=["full_attention"])


def _footprint_on(handler: Any, share: float, max_batch_tokens: int, sectors: int) -> int:
    """What one GPU holds: its share of the cache storage, and every other term in full."""
    return (handler.compute_memory_footprint(max_batch_tokens, sectors)
            - round((1 - share) * sectors * handler.bytes_per_sector))


def test_a_small_first_gpu_bounds_the_inferred_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    free = {"cuda:0": 64 * 2**20, "cuda:1": 8 * GiB}
    handler = _memory_handler(monkeypatch, free, num_blocks=None)
    usable0 = int(free["cuda:0"] * handler.cb_config.max_memory_percent)
    assert handler.available_memory == int(sum(free.values()) * handler.cb_config.max_memory_percent)
    m, s = handler.infer_max_batch_tokens_and_num_sectors()
    # Sized against the sum, cuda:0 would overflow; sized per device, it fits, with no room for one more sector.
    summed = handler.available_memory - handler.fixed_overhead_bytes - m * handler.bytes_per_batch_token
    assert _footprint_on(handler, 0.5, m, summed // handler.bytes_per_cache_sector) > usable0
    assert _footprint_on(handler, 0.5, m, s) <= usable0 < _footprint_on(handler, 0.5, m, s + 1)


def test_a_configured_cache_too_big_for_one_gpu_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    handler = _memory_handler(monkeypatch, {"cuda:0": 8 * GiB, "cuda:1": 64 * 2**20}, num_blocks=20_000)
    with pytest.raises(MemoryError, match=r"do not fit on cuda:1 \(57 MiB usable\)"):
        handler.infer_max_batch_tokens_and_num_sectors()
    fits = _memory_handler(monkeypatch, {"cuda:0": 8 * GiB, "cuda:1": 8 * GiB}, num_blocks=20_000)
    assert fits.infer_max_batch_tokens_and_num_sectors()[1] == 20_000


def test_forking_copies_blocks_in_every_layers_own_storage(models: dict[str, Path]) -> None:
    """copy_blocks on per-layer storage (what a fork does, through PagedAttentionCache.perform_cache_copy): the
    source blocks' K and V rows land in the destination blocks of every layer; no other block changes."""
    model = load_model(Settings(model=str(models["plain"])), models["plain"]).model
    mgr = _manager(model)
    _cb_internals.place_kv_per_layer(mgr, ["cpu"] * model.config.n_layer)
    cache = mgr._create_batch_processor().cache
    (name, allocator), *_ = cache.cache_allocators.items()
    torch.manual_seed(0)
    for k_pages, v_pages in allocator._kv_page_views.values():
        k_pages.copy_(torch.randn_like(k_pages))
        v_pages.copy_(torch.randn_like(v_pages))
    before = {layer: (k.clone(), v.clone()) for layer, (k, v) in allocator._kv_page_views.items()}
    src, dst = [3, 5], [9, 4]
    cache.perform_cache_copy({name: (src, dst)})
    untouched = [b for b in range(next(iter(before.values()))[0].shape[0]) if b not in dst]
    assert len(before) == model.config.n_layer
    for layer, (k, v) in allocator._kv_page_views.items():
        k0, v0 = before[layer]
        assert torch.equal(k[dst], k0[src]) and torch.equal(v[dst], v0[src])
        assert torch.equal(k[untouched], k0[untouched]) and torch.equal(v[untouched], v0[untouched])


def test_logits_of_a_sharded_model_come_out_on_its_input_device(models: dict[str, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampler's tensors go where the logits are: the head's device for a model on one device; model.device
    (where accelerate's hooks return outputs) for a model split over devices, wherever its head sits."""
    loaded = load_model(Settings(model=str(models["plain"])), models["plain"])
    head = torch.nn.Linear(loaded.model.config.n_embd, loaded.model.config.vocab_size, bias=False, device="meta")
    monkeypatch.setattr(loaded.model, "get_output_embeddings", lambda: head)  # the head "on another GPU"
    settings = Settings(model=str(models["plain"]))
    assert GenerationEngine(loaded, settings).logits_device == head.weight.device
    monkeypatch.setattr(LoadedModel, "sharded", property(lambda self: True))
    sharded = GenerationEngine(loaded, settings)
    assert sharded.logits_device == loaded.model.device and str(sharded.logits_device) == "cpu"
    assert sharded.vocab_size == loaded.model.config.vocab_size
