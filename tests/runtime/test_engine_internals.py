"""Every private transformers internal gptd uses (gptd_runtime._cb_internals.INTERNALS) exists in the installed
transformers: an upgrade that renames one fails here with the list of what is missing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from gptd_runtime import _cb_internals
from gptd_runtime.config import Settings
from gptd_runtime.engine import GenerationEngine, SamplingParams
from gptd_runtime.loading import load_model


async def test_installed_transformers_has_every_internal(models: dict[str, Path]) -> None:
    settings = Settings(model=str(models["plain"]), max_new_tokens=8, max_batch_size=4)
    engine = GenerationEngine(load_model(settings, models["plain"]), settings)
    engine.start()
    try:
        await engine.submit([1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0)).collect()
        assert _cb_internals.missing(engine._manager) == []
    finally:
        engine.stop()


def test_missing_names_what_is_gone() -> None:
    """The check itself can fail: a manager without the batching internals is reported attribute by attribute."""
    fake = SimpleNamespace(output_router=SimpleNamespace(result_handlers={}), batch_processor=None)
    gone = _cb_internals.missing(fake)
    assert "ContinuousBatchingManager._generation_step" in gone
    assert "OutputRouter.output_queue" in gone
    assert "ContinuousBatchProcessor (object not found)" in gone
    assert "OutputRouter.result_handlers" not in gone


async def test_engine_forward_passes_skip_the_padding_check(models: dict[str, Path], monkeypatch: Any) -> None:
    """transformers' per-forward padding check (a tensor op and a host sync, only to warn once) is off for the
    engine's model; a plain forward of the same model class still runs it."""
    import torch
    from transformers import PreTrainedModel

    calls: list[int] = []
    original = PreTrainedModel.warn_if_padding_and_no_attention_mask

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "warn_if_padding_and_no_attention_mask", counting)
    settings = Settings(model=str(models["plain"]), max_new_tokens=8, max_batch_size=4)
    other = load_model(settings, models["plain"]).model
    with torch.no_grad():
        other(torch.tensor([[1, 2, 3]]))
    assert calls, "the check runs on a plain forward (else this test proves nothing)"
    calls.clear()
    engine = GenerationEngine(load_model(settings, models["plain"]), settings)
    engine.start()
    try:
        await engine.submit([1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0)).collect()
    finally:
        engine.stop()
    assert calls == []
