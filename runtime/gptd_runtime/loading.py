"""Model URI -> local directory -> (model, tokenizer). Every failure becomes one ModelLoadError with a
one-line reason, which the CLI prints before exiting non-zero (a pod must crash-loop visibly, not hang)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .config import Settings

log = logging.getLogger("gptd_runtime.loading")


class ModelLoadError(Exception):
    """The model cannot be resolved or loaded. str() is a single line meant for humans."""


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # PreTrainedTokenizerFast
    path: Path
    task: str
    device: str
    devices: tuple[str, ...] = ()  # every device holding weights (placement.devices)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _hf_token(settings: Settings) -> str | None:
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    if settings.hf_token_file is not None:
        try:
            return settings.hf_token_file.read_text().strip() or None
        except OSError as e:
            raise ModelLoadError(f"cannot read HF token file {settings.hf_token_file}: {_one_line(e)}") from e
    return None


def resolve_model_dir(settings: Settings) -> Path:
    """Map --model to a local directory holding config.json (downloading hf:// repos into HF_HOME)."""
    uri = settings.model
    if settings.demo and not uri:
        from .demo import build_demo_model

        # Built once into the cache dir and reused on restarts.
        return build_demo_model(settings.cache_dir / "demo" / settings.task, settings.task)
    if not uri:
        raise ModelLoadError("no model given: pass --model PATH_OR_URI (or GPTD_MODEL), or --demo")
    parsed = urlparse(uri)
    scheme = parsed.scheme if len(parsed.scheme) > 1 else ""  # "C:\..." is not a scheme
    if scheme == "hf":
        repo_id = (parsed.netloc + parsed.path).strip("/")
        if repo_id.count("/") != 1:
            raise ModelLoadError(f"hf:// URI must look like hf://org/name, got {uri!r}")
        try:
            from huggingface_hub import snapshot_download

            # HF_HOME decides the cache; HF_HUB_OFFLINE=1 serves from a warm cache without network.
            path = Path(snapshot_download(repo_id, revision=settings.revision, token=_hf_token(settings)))
        except Exception as e:
            raise ModelLoadError(f"cannot download {uri} (revision {settings.revision}): {_one_line(e)}") from e
    elif scheme in ("pvc", "s3", "gs"):
        # The operator mounts/syncs these and passes the resulting local path; the runtime never talks to
        # storage APIs itself.
        raise ModelLoadError(
            f"{scheme}:// URIs are resolved by the gptd operator (it mounts the volume and passes a local path); "
            "pass the local directory instead"
        )
    elif scheme in ("file", ""):
        path = Path(parsed.path if scheme == "file" else uri).expanduser()
    else:
        raise ModelLoadError(f"unsupported model URI scheme {scheme!r} in {uri!r} (use a path, file:// or hf://)")
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {path} has no config.json (not a Hugging Face model directory)")
    return path


def cpu_budget() -> int:
    """CPUs this process may really use: the cgroup v2 quota (a pod's CPU limit) and the affinity mask.
    os.cpu_count() reports the node's cores, which inside a pod is usually far too many."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


def default_torch_threads() -> int:
    # One core is left to the event loop (HTTP, tokenizing, streaming). OpenMP threads spin-wait for each
    # other, so one oversubscribed core stalls every op: measured on a 2-core box with a busy neighbour,
    # 2 threads gave ~10x lower throughput than 1.
    budget = cpu_budget()
    return max(1, budget - 1)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> bool:
    """Keep freed CPU tensor memory in the process instead of handing it back to the kernel each step.

    Every forward pass allocates and frees activation tensors of a few MiB. glibc mmaps blocks above its
    mmap threshold (or trims the heap top) and returns them on free, so the next step takes a fresh page
    fault per 4 KiB. glibc raises the threshold adaptively, but whether it does depends on the allocation
    history: the same server measured 2-20k or 600k minor faults per 4,096 generated tokens, and ~30% lower
    throughput in the second case. Fixed thresholds (32 MiB mmap, glibc's maximum; 1 GiB trim) make the
    good case deterministic. Retained memory stays bounded by the peak working set. No-op without glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, 32 * 2**20) == 1
    return mallopt(_M_TRIM_THRESHOLD, 2**30) == 1 and ok


@dataclass(frozen=True)
class Placement:
    """Where the model goes. ``device``: this process's device (inputs, KV cache); ``devices``: every device that
    holds weights; ``tp_plan``: "auto" to shard the weights tensor-parallel over the process group."""

    device: str
    devices: tuple[str, ...]
    tp_plan: str | None = None


def plan_placement(requested: str, gpu_count: int, world_size: int = 1, rank: int = 0) -> Placement:
    """Pure placement decision. With more than one visible GPU the model is sharded over all of them, never
    silently put on one: transformers' continuous batching keeps the paged KV cache on one device per process, so
    pipeline sharding (device_map="auto") cannot serve it; it supports tensor parallelism, one process per GPU
    (`torchrun --nproc-per-node N`). Run as one process with N > 1 GPUs, this refuses with the two ways out.
    Raises ModelLoadError."""
    if requested == "cpu":
        return Placement("cpu", ("cpu",))
    if requested == "auto":
        if gpu_count == 0:
            return Placement("cpu", ("cpu",))
        requested = "cuda"
    if not requested.startswith("cuda"):
        raise ModelLoadError(f"unsupported device {requested!r} (use auto, cpu, cuda or cuda:N)")
    if gpu_count == 0:
        raise ModelLoadError(f"device {requested!r} requested but no CUDA device is visible")
    if requested.startswith("cuda:"):  # one GPU, named explicitly: the user's choice
        index = requested.split(":", 1)[1]
        if not index.isdigit() or int(index) >= gpu_count:
            raise ModelLoadError(f"device {requested!r}: only {gpu_count} CUDA device(s) visible (cuda:0..cuda:"
                                 f"{gpu_count - 1})")
        return Placement(requested, (requested,))
    if requested != "cuda":
        raise ModelLoadError(f"unsupported device {requested!r} (use auto, cpu, cuda or cuda:N)")
    every = tuple(f"cuda:{i}" for i in range(gpu_count))
    if gpu_count == 1:
        return Placement("cuda:0", every)
    if world_size == gpu_count:
        return Placement(f"cuda:{rank}", every, tp_plan="auto")
    if world_size == 1:
        raise ModelLoadError(
            f"{gpu_count} GPUs are visible but the runtime runs as one process: it would use only one. Shard the "
            f"model over all of them with tensor parallelism (torchrun --nproc-per-node {gpu_count} -m gptd_runtime "
            "serve ...), or choose one GPU with --device cuda:N (or CUDA_VISIBLE_DEVICES)")
    raise ModelLoadError(f"{world_size} processes for {gpu_count} visible GPUs: run one process per GPU")


def placement_for(requested: str) -> Placement:
    """plan_placement() for this process: visible GPUs and torchrun's WORLD_SIZE / LOCAL_RANK."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return plan_placement(requested, gpus, int(os.environ.get("WORLD_SIZE", "1")),
                          int(os.environ.get("LOCAL_RANK", "0")))


def _pick_dtype(requested: str, device: str) -> Any:
    import torch

    if requested == "auto":
        # Half precision on CPU is slow and poorly supported; on GPUs fp16/bf16 is the norm.
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, requested)


def load_model(settings: Settings, path: Path) -> LoadedModel:
    """Load weights and tokenizer. Slow (seconds to minutes): called off the event loop."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    classes = {
        "text-generation": AutoModelForCausalLM,
        "text-classification": AutoModelForSequenceClassification,
        "token-classification": AutoModelForTokenClassification,
    }
    import torch

    placement = placement_for(settings.device)
    if placement.tp_plan is not None:
        # Loading would work (from_pretrained(tp_plan="auto")), but serving would not: every rank would start its
        # own HTTP server and batch loop, while continuous batching's TP mode wants rank 0 alone to take requests.
        raise ModelLoadError(
            f"tensor-parallel serving over {len(placement.devices)} GPUs (torchrun) is not implemented yet; "
            "run one process per GPU-sized model with --device cuda:N")
    device = placement.device
    if device == "cpu":
        threads = settings.torch_threads or default_torch_threads()
        torch.set_num_threads(threads)  # applies to the engine's worker threads too
        log.debug("using %d CPU thread(s) for torch", threads)
        if tune_malloc():
            log.debug("malloc: 32 MiB mmap threshold, 1 GiB trim threshold")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = classes[settings.task].from_pretrained(path, dtype=_pick_dtype(settings.dtype, device))
        model = model.to(device).eval()
    except Exception as e:
        raise ModelLoadError(f"cannot load {settings.task} model from {path}: {_one_line(e)}") from e
    if settings.task != "text-generation" and not getattr(model.config, "id2label", None):
        raise ModelLoadError(f"{settings.task} model at {path} has no id2label in its config")
    log.debug("loaded %s model from %s on %s (%s)", settings.task, path, ", ".join(placement.devices), model.dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, task=settings.task, device=device,
                       devices=placement.devices)
