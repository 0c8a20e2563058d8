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
    # The device of each decoder layer, in layer order (empty: not a decoder stack, e.g. classification). More
    # than one distinct device means the model is pipeline-sharded and its KV cache must follow (engine.py).
    layer_devices: tuple[str, ...] = ()

    @property
    def sharded(self) -> bool:
        return len(set(self.layer_devices)) > 1

    def describe_devices(self) -> str:
        """For the start-up line: one device, or which layers sit on which device."""
        return describe_layer_devices(self.layer_devices) if self.sharded else self.device


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
    holds weights; ``tp_plan``: "auto" to shard the weights tensor-parallel over the process group;
    ``device_map``: "auto" to split the layers over ``devices`` in this one process (each layer's KV cache on its
    layer's device, see _cb_internals.place_kv_per_layer)."""

    device: str
    devices: tuple[str, ...]
    tp_plan: str | None = None
    device_map: str | None = None


def plan_placement(requested: str, gpu_count: int, world_size: int = 1, rank: int = 0) -> Placement:
    """Pure placement decision. With more than one visible GPU the model is sharded over all of them, never
    silently put on one: in one process by layers (device_map="auto": each GPU holds a contiguous run of layers
    and their KV cache), or tensor-parallel with one process per GPU under torchrun (decided here, refused by
    load_model until served). Raises ModelLoadError."""
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
        # Inputs and the embeddings go to the first GPU; accelerate's hooks carry activations layer to layer.
        return Placement("cuda:0", every, device_map="auto")
    raise ModelLoadError(f"{world_size} processes for {gpu_count} visible GPUs: run one process per GPU")


# Memory left free on each GPU beside its weights and its share of the KV cache: activations of a full batch,
# the CUDA context, allocator fragmentation. A fraction of the GPU, at least this much.
ACTIVATION_RESERVE_FRACTION = 0.10
ACTIVATION_RESERVE_MIN = 1 << 30


def plan_max_memory(free_bytes: list[int], kv_bytes: int) -> dict[int, int]:
    """Pure: the weight budget per GPU (accelerate's ``max_memory``) for device_map="auto", leaving each GPU room
    for its share of the KV cache. The "auto" (balanced) map gives each GPU about 1/N of the layers, hence about
    1/N of the KV cache; check_kv_fits() verifies the real split after loading. Raises ModelLoadError when a GPU
    has no room left for weights."""
    n = len(free_bytes)
    kv_share = -(-kv_bytes // n)
    budget = {}
    for i, free in enumerate(free_bytes):
        reserve = max(int(free * ACTIVATION_RESERVE_FRACTION), ACTIVATION_RESERVE_MIN)
        room = free - kv_share - reserve
        if room <= 0:
            raise ModelLoadError(
                f"cuda:{i} has {free / 2**30:.1f} GiB free, not enough for its share of the KV cache "
                f"({kv_share / 2**30:.1f} GiB) plus {reserve / 2**30:.1f} GiB for activations: lower "
                "GPTD_KV_CACHE_BLOCKS")
        budget[i] = room
    return budget


def kv_bytes_by_device(layer_devices: tuple[str, ...], kv_bytes: int) -> dict[str, int]:
    """Pure: each device's part of a KV cache of ``kv_bytes`` split by layer (every layer the same size)."""
    out: dict[str, int] = {}
    for d in layer_devices:
        out[d] = out.get(d, 0) + kv_bytes // len(layer_devices)
    return out


def check_kv_fits(layer_devices: tuple[str, ...], kv_bytes: int, free_after_load: dict[str, int]) -> None:
    """Pure: refuse (ModelLoadError naming the device) a split whose KV part does not fit where it lands."""
    for device, need in kv_bytes_by_device(layer_devices, kv_bytes).items():
        free = free_after_load.get(device)
        if free is not None and need > free:
            raise ModelLoadError(
                f"{device} holds {layer_devices.count(device)} layers whose KV cache needs {need / 2**20:.0f} MiB "
                f"but only {free / 2**20:.0f} MiB is free after loading the weights: lower GPTD_KV_CACHE_BLOCKS")


def offloaded_modules(hf_device_map: dict[str, Any]) -> list[str]:
    """Pure: modules accelerate put on the CPU or disk (the model did not fit on the GPUs)."""
    return sorted(name or "(model)" for name, d in hf_device_map.items() if d in ("cpu", "disk"))


def unshardable_attention(config: Any) -> str | None:
    """Pure: why this model's KV cache cannot be split by layer (None: it can). Mirrors how transformers groups
    layers (continuous_batching/cache.py group_layers_by_attn_type): layer_types if given, else every layer
    sliding when sliding_window is set. Only full-attention caches are split (_cb_internals.shard_cache)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(cfg, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if getattr(cfg, "sliding_window", None) is not None else "full_attention"]
    other = sorted(set(types) - {"full_attention"})
    return f"its {', '.join(other)} layers' KV cache cannot be split over GPUs" if other else None


def describe_layer_devices(layer_devices: tuple[str, ...]) -> str:
    """Pure: "cuda:0 (layers 0-15), cuda:1 (layers 16-31)"; runs of consecutive layers per device."""
    runs: list[tuple[str, int, int]] = []
    for i, d in enumerate(layer_devices):
        if runs and runs[-1][0] == d and runs[-1][2] == i - 1:
            runs[-1] = (d, runs[-1][1], i)
        else:
            runs.append((d, i, i))
    parts = [f"{d} (layer{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''})" for d, a, b in runs]
    return ", ".join(parts)


def decoder_layer_devices(model: Any) -> tuple[str, ...]:
    """The device of each decoder layer's weights, in layer order: the decoder's own layer list (GPT-2's
    transformer.h, Llama's model.layers, ...), found on the base model, not just any ModuleList of
    num_hidden_layers modules (a model may register another one first, e.g. per-layer adapters). Empty when
    there is no such list."""
    import torch

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(cfg, "num_hidden_layers", None)
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    for owner in (decoder, getattr(model, "base_model", None), model):
        for name in ("layers", "h", "layer", "blocks"):
            module = getattr(owner, name, None) if owner is not None else None
            if isinstance(module, torch.nn.ModuleList) and n and len(module) == n:
                return tuple(str(next(layer.parameters()).device) for layer in module)
    return ()


def kv_cache_bytes(model: Any, settings: Settings) -> int:
    """Approximate KV cache size for the configured budget (keys + values, every layer)."""
    return _kv_bytes(model.config, model.dtype.itemsize, settings)


def _kv_bytes(config: Any, itemsize: int, settings: Settings) -> int:
    cfg = config.get_text_config()
    heads = getattr(cfg, "num_attention_heads", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per_token = cfg.num_hidden_layers * 2 * kv_heads * head_dim * itemsize
    return per_token * settings.kv_cache_page_size * settings.kv_blocks()


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
    dtype = _pick_dtype(settings.dtype, device)
    shard = placement.device_map is not None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if shard:
            model = _load_sharded(classes[settings.task], path, dtype, settings, len(placement.devices))
        else:
            model = classes[settings.task].from_pretrained(path, dtype=dtype).to(device)
        model = model.eval()
        drop_dropout(model)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot load {settings.task} model from {path}: {_one_line(e)}") from e
    if settings.task != "text-generation" and not getattr(model.config, "id2label", None):
        raise ModelLoadError(f"{settings.task} model at {path} has no id2label in its config")
    layers = decoder_layer_devices(model)
    devices = (tuple(dict.fromkeys(layers)) or placement.devices) if shard else placement.devices
    if shard:
        _check_sharded(model, layers, settings)
    log.debug("loaded %s model from %s on %s (%s)", settings.task, path, ", ".join(devices), model.dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, task=settings.task, device=device,
                       devices=devices, layer_devices=layers)


def drop_dropout(model: Any) -> int:
    """Replace every nn.Dropout by an identity that keeps ``p``: an inference server never trains, and in eval
    mode dropout is the identity anyway, but each call still costs a Python module call (GPT-2: 2-3 per layer,
    ~2 % of a batch-1 step on CPU). ``p`` stays readable (attention code reads ``dropout.p if training``).
    Returns how many were replaced."""
    import torch

    class NoDropout(torch.nn.Identity):
        def __init__(self, p: float):
            super().__init__()
            self.p = p

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Dropout):
                setattr(parent, name, NoDropout(child.p))
                replaced += 1
    return replaced


def _load_sharded(cls: Any, path: Path, dtype: Any, settings: Settings, gpus: int) -> Any:
    """device_map="auto" over every visible GPU, each keeping room for its share of the KV cache."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    kv = _kv_bytes(config, dtype.itemsize, settings) if settings.task == "text-generation" else 0
    free = [torch.cuda.mem_get_info(i)[0] for i in range(gpus)]
    max_memory = plan_max_memory(free, kv)
    log.debug("sharding over %d GPUs, weight budget per GPU: %s", gpus,
              ", ".join(f"cuda:{i} {b / 2**30:.1f} GiB" for i, b in max_memory.items()))
    return cls.from_pretrained(path, dtype=dtype, device_map="auto", max_memory=max_memory)


def _check_sharded(model: Any, layers: tuple[str, ...], settings: Settings) -> None:
    import torch

    off = offloaded_modules(getattr(model, "hf_device_map", {}) or {})
    if off:
        raise ModelLoadError(
            f"the model does not fit on the visible GPUs with room for the KV cache: accelerate offloaded "
            f"{', '.join(off[:3])}{' ...' if len(off) > 3 else ''} to the CPU/disk (lower GPTD_KV_CACHE_BLOCKS or "
            "add GPUs)")
    if settings.task != "text-generation":
        return  # no KV cache: accelerate's split is all there is
    if not layers:
        raise ModelLoadError("cannot shard this model over GPUs: no decoder layer list found")
    reason = unshardable_attention(model.config)
    if reason:
        raise ModelLoadError(f"cannot shard this model over GPUs: {reason}; choose one GPU with --device cuda:N")
    free = {f"cuda:{i}": torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
    check_kv_fits(layers, kv_cache_bytes(model, settings), free)
