"""Every private transformers internal gptd uses (gptd_runtime._cb_internals.INTERNALS) exists in the installed
transformers: an upgrade that renames one fails here with the list of what is missing."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gptd_runtime
import pytest
from gptd_runtime import _cb_internals
from gptd_runtime.config import Settings
from gptd_runtime.engine import GenerationEngine, SamplingParams
from gptd_runtime.loading import load_model


async def test_installed_transformers_has_every_internal(models: dict[str, Path]) -> None:
    # On the CPU: that is where the engine installs gptd's attention, whose direct cache reads are checked below.
    settings = Settings(model=str(models["plain"]), device="cpu", max_new_tokens=8, max_batch_size=4)
    engine = GenerationEngine(load_model(settings, models["plain"]), settings)
    engine.start()
    try:
        await engine.submit([1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0)).collect()
        assert _cb_internals.missing(engine._manager) == []
        # On CPU the engine's attention reads the paged cache it got through _cb_internals.cache_of directly.
        assert engine._attention is not None and engine._attention.direct_layers
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


RUNTIME = Path(gptd_runtime.__file__).parent
# The names under which gptd's modules hold transformers' batching objects (manager, batch processor, cache, router).
_HOLDERS = {"bp", "mgr", "manager", "self._manager", "cache", "router", "batch_processor"}
# Private INTERNALS names distinctive enough to flag on any receiver but `self` ("_lock" is not: fetch.py has one).
_DISTINCTIVE = {attr for _, attr in _cb_internals.INTERNALS if attr.startswith("_")} - {"_lock"}


def internal_reads(source: str) -> list[str]:
    """Attribute reads in `source` that reach into an INTERNALS name outside _cb_internals."""
    names = {attr for _, attr in _cb_internals.INTERNALS}
    found = []
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.Attribute) and n.attr in names:
            receiver = ast.unparse(n.value)
            if receiver in _HOLDERS or (n.attr in _DISTINCTIVE and receiver != "self"):
                found.append(f"{n.lineno}: {ast.unparse(n)}")
    return found


@pytest.mark.parametrize("path", sorted(p for p in RUNTIME.rglob("*.py") if p.name != "_cb_internals.py"),
                         ids=lambda p: str(p.relative_to(RUNTIME)))
def test_only_cb_internals_touches_the_internals(path: Path) -> None:
    assert internal_reads(path.read_text()) == [], path.name


def test_the_internals_check_can_fail() -> None:
    assert internal_reads("direct = self._attention.enable_direct_reads(bp.cache)") == ["1: bp.cache"]
    assert internal_reads("m._generation_step = f\nself._sample = g") == ["1: m._generation_step"]


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
