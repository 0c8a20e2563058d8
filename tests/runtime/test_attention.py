"""gptd's per-request attention (attention.py) computes exactly what transformers' packed sdpa computes, and the
generation engine produces the same greedy tokens with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from gptd_runtime import attention
from torch.nn.functional import scaled_dot_product_attention


class _Module:
    is_causal = True
    num_key_value_groups = 1
    layer_idx = 0


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lq: list[int], lk: list[int]) -> torch.Tensor:
    """The packed row attended with a block-diagonal, bottom-right causal mask (what the manager builds)."""
    mask = torch.zeros(sum(lq), sum(lk), dtype=torch.bool)
    qs = ks = 0
    for a, b in zip(lq, lk, strict=True):
        mask[qs : qs + a, ks : ks + b] = torch.ones(a, b, dtype=torch.bool).tril(b - a)
        qs, ks = qs + a, ks + b
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125)
    return out.transpose(1, 2)


# Decoding requests (1 query token), a whole prefill, a later prefill chunk, decoders of uneven length; a pure
# decode pass of uneven lengths (padding mask); a pure decode pass of equal lengths (no mask); batch 1.
LAYOUTS = {
    "mixed": ([1, 1, 7, 1, 5, 1], [9, 30, 7, 2, 12, 17]),
    "decode": ([1, 1, 1, 1], [9, 30, 2, 17]),
    "decode-equal": ([1, 1, 1], [12, 12, 12]),
    "one": ([1], [23]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("direct", [False, True, "token-major"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_matches_packed_sdpa(kv_heads: int, direct: bool | str, layout: str) -> None:
    torch.manual_seed(0)
    lq, lk = LAYOUTS[layout]
    heads, dim = 4, 64
    q = torch.randn(1, heads, sum(lq), dim)
    # The cache returns K/V token-major and transposed, as transformers' paged cache does.
    k = torch.randn(sum(lk), kv_heads, dim).transpose(0, 1)[None]
    v = torch.randn(sum(lk), kv_heads, dim).transpose(0, 1)[None]
    cu = {"cu_seq_lens_q": torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32),
          "cu_seq_lens_k": torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)}
    attn = attention.VarlenAttention()
    attn.direct_layers = {0: 0} if direct else {}
    if direct:  # K/V are the whole cache; the packed row is read_index into it
        slots = torch.randperm(3 * sum(lk))[: sum(lk)]
        k_cache, v_cache = torch.randn(3 * sum(lk), kv_heads, dim), torch.randn(3 * sum(lk), kv_heads, dim)
        k_cache[slots], v_cache[slots] = k[0].transpose(0, 1), v[0].transpose(0, 1)
        kin, vin = k_cache.transpose(0, 1)[None], v_cache.transpose(0, 1)[None]
        if direct == "token-major":  # as _cb_internals.make_cache_write_only's update returns them
            kin, vin = k_cache, v_cache
        got, _ = attn(_Module(), q, kin, vin, None, scaling=0.125, read_index=[slots], **cu)
    else:
        got, _ = attn(_Module(), q, k, v, None, scaling=0.125, **cu)
    rep = heads // kv_heads
    want = _reference(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), lq, lk)
    assert got.shape == (1, sum(lq), heads, dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # A second layer of the same pass (layout and gathered positions reused) computes the same.
    again, _ = attn(_Module(), q, kin, vin, None, scaling=0.125, read_index=[slots], **cu) if direct else \
        attn(_Module(), q, k, v, None, scaling=0.125, **cu)
    torch.testing.assert_close(again, want, atol=1e-5, rtol=1e-5)


def test_unsupported_arguments_fail_loudly() -> None:
    q = torch.randn(1, 2, 1, 8)
    cu = {"cu_seq_lens_q": torch.tensor([0, 1]), "cu_seq_lens_k": torch.tensor([0, 1])}
    with pytest.raises(NotImplementedError):
        attention.VarlenAttention()(_Module(), q, q, q, None, sliding_window=4, **cu)


def _greedy_tokens(model_dir: Path, use_gptd_attention: bool) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert attention.supported(model.config)
    gen = GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=-1, pad_token_id=0)
    # Small max_batch_tokens: prompts are prefilled in chunks next to decoding requests.
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=64, max_batch_tokens=24, max_requests_per_batch=8)
    mgr: Any = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    if use_gptd_attention:
        attn = attention.VarlenAttention()
        model.config._attn_implementation = attn.register()
        step, patched = mgr._generation_step, []

        def first_step_patches_cache() -> None:  # as GenerationEngine does: the cache exists from the first step
            if not patched:
                patched.append(attn.enable_direct_reads(mgr.batch_processor.cache))
            step()

        mgr._generation_step = first_step_patches_cache
    prompts = [[(7 * i + j) % 50 + 3 for j in range(n)] for i, n in enumerate([3, 17, 40, 5, 29, 11])]
    mgr.start()
    try:
        for i, p in enumerate(prompts):
            mgr.add_request(p, request_id=f"r{i}", max_new_tokens=12)
        results = {}
        for _ in prompts:
            out = mgr.get_result(timeout=60)
            assert out is not None and out.error is None
            results[out.request_id] = out.generated_tokens
    finally:
        mgr.stop(block=True)
    if use_gptd_attention:
        assert patched == [True]
    return [results[f"r{i}"] for i in range(len(prompts))]


def test_engine_tokens_unchanged(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    # Not the demo model: with its small init every prompt greedily repeats one token whatever the attention
    # does. Large weights make the next token depend on the context, so wrong attention changes the output.
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=256, initializer_range=0.5)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    want = _greedy_tokens(tmp_path, use_gptd_attention=False)
    got = _greedy_tokens(tmp_path, use_gptd_attention=True)
    assert all(len(t) == 12 for t in got)
    assert all(len(set(t)) > 3 for t in want)  # the comparison means something
    assert got == want


def test_engines_do_not_share_attention_state() -> None:
    """Two engines in one process (tests, a restart): each has its own registered name and direct-read layers."""
    a, b = attention.VarlenAttention(), attention.VarlenAttention()
    a.direct_layers = {0: 0}
    assert a.register() != b.register()
    assert b.direct_layers == {}
    from transformers import AttentionInterface

    assert AttentionInterface._global_mapping[b.name] == b.__call__
