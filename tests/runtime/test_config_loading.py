"""Settings from flags/env, model URI resolution, and the demo builder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from gptd_runtime.__main__ import _parser
from gptd_runtime.config import ENV_VARS, Settings, load_settings
from gptd_runtime.demo import build_demo_model
from gptd_runtime.loading import ModelLoadError, resolve_model_dir
from pydantic import ValidationError


def test_env_vars_fill_every_field() -> None:
    assert set(ENV_VARS) == set(Settings.model_fields)
    env = {"GPTD_MODEL": "/m", "GPTD_PORT": "9000", "GPTD_MAX_BATCH_SIZE": "4", "GPTD_MAX_QUEUE": "0",
           "GPTD_DRAIN_TIMEOUT_SECONDS": "2.5", "GPTD_MAX_BODY_BYTES": "10", "GPTD_KV_CACHE_BLOCKS": "7",
           "GPTD_TASK": "Text-Classification", "GPTD_DEMO": "true"}
    s = load_settings({}, env)
    assert (s.model, s.port, s.max_batch_size, s.max_queue) == ("/m", 9000, 4, 0)
    assert (s.drain_timeout_seconds, s.max_body_bytes, s.kv_blocks()) == (2.5, 10, 7)
    assert s.task == "text-classification" and s.demo is True


def test_flags_override_env() -> None:
    s = load_settings({"port": 1234, "model": None}, {"GPTD_PORT": "9000", "GPTD_MODEL": "/env"})
    assert s.port == 1234 and s.model == "/env"


def test_invalid_values_rejected() -> None:
    with pytest.raises(ValidationError):
        load_settings({}, {"GPTD_MAX_BATCH_SIZE": "zero"})
    with pytest.raises(ValidationError):
        load_settings({}, {"GPTD_TASK": "summarization"})


def test_default_kv_budget_fits_full_batch() -> None:
    s = Settings(max_batch_size=8, max_input_tokens=100, max_new_tokens=28, kv_cache_page_size=64)
    assert s.kv_blocks() == 8 * 2


@pytest.mark.parametrize(("uri", "message"), [
    ("pvc://claim/models/x", "resolved by the gptd operator"),
    ("s3://bucket/x", "resolved by the gptd operator"),
    ("ftp://host/x", "unsupported model URI scheme"),
    ("hf://justname", "hf://org/name"),
    ("/definitely/not/here", "does not exist"),
])
def test_uri_errors_are_clear(uri: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        resolve_model_dir(Settings(model=uri))


def test_local_and_file_uris(models: dict[str, Path], tmp_path: Path) -> None:
    path = models["plain"]
    assert resolve_model_dir(Settings(model=str(path))) == path
    assert resolve_model_dir(Settings(model=f"file://{path}")) == path
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        resolve_model_dir(Settings(model=str(tmp_path)))


def test_hf_uri_offline_cache_miss_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="cannot download hf://org/name"):
        resolve_model_dir(Settings(model="hf://org/name", revision="main"))


def test_demo_builder_is_cached(tmp_path: Path) -> None:
    out = build_demo_model(tmp_path / "d")
    assert json.loads((out / "config.json").read_text())["n_layer"] == 2
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert build_demo_model(tmp_path / "d") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    with pytest.raises(ValueError, match="unknown task"):
        build_demo_model(tmp_path / "e", "summarization")


def test_demo_setting_builds_into_cache_dir(tmp_path: Path) -> None:
    path = resolve_model_dir(Settings(demo=True, cache_dir=tmp_path, task="token-classification"))
    labels = json.loads((path / "config.json").read_text())["id2label"]
    assert "B-PER" in labels.values()


def test_every_setting_has_a_flag() -> None:
    flags = {a.dest for a in _parser()._subparsers._group_actions[0].choices["serve"]._actions}  # type: ignore[union-attr]
    assert set(ENV_VARS) <= flags
    assert _parser().parse_args(["serve", "--demo", "--torch-threads", "3"]).torch_threads == 3


def test_tune_malloc_applies_on_glibc() -> None:
    import platform

    from gptd_runtime.loading import tune_malloc

    applied = tune_malloc()
    if platform.libc_ver()[0] == "glibc":
        assert applied


# -- placement: a pure decision, tested without GPUs ---------------------------------------------------------
@pytest.mark.parametrize(("requested", "gpus", "world", "rank", "device", "devices", "tp"), [
    ("cpu", 4, 1, 0, "cpu", ("cpu",), None),
    ("auto", 0, 1, 0, "cpu", ("cpu",), None),
    ("auto", 1, 1, 0, "cuda:0", ("cuda:0",), None),
    ("cuda", 1, 1, 0, "cuda:0", ("cuda:0",), None),
    ("cuda:1", 2, 1, 0, "cuda:1", ("cuda:1",), None),  # one GPU named explicitly: the user's choice
    ("cuda", 4, 4, 2, "cuda:2", ("cuda:0", "cuda:1", "cuda:2", "cuda:3"), "auto"),  # torchrun: shard, rank 2
    ("auto", 2, 2, 0, "cuda:0", ("cuda:0", "cuda:1"), "auto"),
])  # several GPUs in one process: tests/runtime/test_engine_placement.py
def test_placement(requested: str, gpus: int, world: int, rank: int, device: str, devices: tuple[str, ...],
                   tp: str | None) -> None:
    from gptd_runtime.loading import Placement, plan_placement

    assert plan_placement(requested, gpus, world, rank) == Placement(device, devices, tp)


@pytest.mark.parametrize(("requested", "gpus", "world", "message"), [
    ("cuda", 0, 1, "no CUDA device is visible"),
    ("cuda:2", 2, 1, "only 2 CUDA device(s) visible"),
    ("cuda:x", 2, 1, "only 2 CUDA device(s) visible"),
    ("tpu", 0, 1, "unsupported device 'tpu'"),
    ("cuda", 4, 2, "2 processes for 4 visible GPUs"),
])
def test_placement_refusals(requested: str, gpus: int, world: int, message: str) -> None:
    from gptd_runtime.loading import ModelLoadError, plan_placement

    with pytest.raises(ModelLoadError, match=re.escape(message)):
        plan_placement(requested, gpus, world)


def test_tensor_parallel_load_is_refused_until_served(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from gptd_runtime import loading

    monkeypatch.setattr(loading, "placement_for", lambda _: loading.plan_placement("cuda", 2, 2, 0))
    with pytest.raises(loading.ModelLoadError, match="tensor-parallel serving over 2 GPUs"):
        loading.load_model(Settings(model=str(models["plain"]), device="cuda"), models["plain"])


def test_dropout_is_dropped_with_identical_outputs(models: dict[str, Path]) -> None:
    """loading.drop_dropout: no nn.Dropout module is left (each costs a Python call per layer per step), `p` stays
    readable, and the logits equal those of the unmodified model in eval mode."""
    import torch
    from gptd_runtime import loading
    from transformers import AutoModelForCausalLM

    loaded = loading.load_model(Settings(model=str(models["plain"])), models["plain"])
    reference = AutoModelForCausalLM.from_pretrained(models["plain"]).eval()
    assert any(isinstance(m, torch.nn.Dropout) for m in reference.modules())
    assert not any(isinstance(m, torch.nn.Dropout) for m in loaded.model.modules())
    assert loaded.model.transformer.h[0].attn.attn_dropout.p == reference.transformer.h[0].attn.attn_dropout.p
    ids = torch.tensor([[5, 9, 3, 7, 1]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits, rtol=0, atol=0)
