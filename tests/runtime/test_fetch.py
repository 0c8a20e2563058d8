"""`gptd_runtime fetch` against a local hub server (tests/support/hub.py) serving a tiny model built here:
selection, resume after a kill and after a dropped connection, verification, atomic publication, errors."""

from __future__ import annotations

import fcntl
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from gptd_runtime import fetch as fetch_mod
from gptd_runtime.config import Settings
from gptd_runtime.fetch import (
    INCOMPLETE,
    MARKER,
    PERMANENT_EXIT_CODE,
    FetchError,
    FetchOptions,
    RemoteFile,
    complete_revision,
    fetch,
    resolve_ref,
    select_files,
)
from gptd_runtime.loading import load_model, resolve_model_dir

from tests.support.hub import FakeHub
from tests.support.runtime import REPO

REPO_ID = "acme/tiny-gpt"
WEIGHTS = "model.safetensors"
# Files a real transformers repo also carries that the runtime never loads.
EXTRAS = {
    "pytorch_model.bin": b"\0" * 4096,
    "onnx/model.onnx": b"onnx" * 1000,
    "flax_model.msgpack": b"flax" * 1000,
    "tf_model.h5": b"tf" * 1000,
    "model.gguf": b"gguf" * 1000,
    "README.md": b"# tiny\n",
    ".gitattributes": b"*.safetensors filter=lfs\n",
}


def _names(*names: str) -> list[RemoteFile]:
    return [RemoteFile(n, 1, None) for n in names]


def test_select_files_prefers_safetensors_and_skips_other_formats() -> None:
    repo = _names("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "merges.txt", "vocab.json", "tokenizer.model", "chat_template.jinja",
                  "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                  "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin",
                  "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "training_args.bin",
                  "onnx/model.onnx", "model.onnx", "flax_model.msgpack", "tf_model.h5", "model.gguf",
                  "original/consolidated.00.pth", "README.md", ".gitattributes",
                  "../escape.json", "..", ".hidden.json", "sub/../config.json")  # nothing may leave the directory
    assert [f.name for f in select_files(repo)] == [
        "chat_template.jinja", "config.json", "generation_config.json", "merges.txt",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
    ]
    bin_only = _names("config.json", "pytorch_model.bin", "tokenizer.json", "flax_model.msgpack")
    assert [f.name for f in select_files(bin_only)] == ["config.json", "pytorch_model.bin", "tokenizer.json"]


def test_parse_repo_id_refuses_other_schemes() -> None:
    assert fetch_mod.parse_repo_id("hf://acme/tiny") == "acme/tiny"
    assert fetch_mod.parse_repo_id("acme/tiny") == "acme/tiny"
    for bad in ("s3://bucket/model", "hf://justname", "hf://a/b/c"):
        with pytest.raises(FetchError) as e:
            fetch_mod.parse_repo_id(bad)
        assert e.value.reason == "InvalidArgument"


@pytest.fixture
def hub(models: dict[str, Path]) -> Iterator[FakeHub]:
    with FakeHub() as h:
        h.add_directory(REPO_ID, models["plain"], extra=EXTRAS)
        yield h


def _cli(dest: Path, *args: str, env: dict[str, str], revision: str = "main", uri: str = f"hf://{REPO_ID}",
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "GPTD_HF_TOKEN_FILE")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "gptd_runtime", "fetch", uri, "--revision", revision,
         "--dest", str(dest), "--progress-interval", "0", *args],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def _lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def _resolved(hub: FakeHub) -> list[str]:
    return [r["path"].split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.requests if "/resolve/" in r["path"]]


def test_cli_fetches_only_what_the_runtime_loads_and_the_loader_loads_it(
        hub: FakeHub, models: dict[str, Path], tmp_path: Path) -> None:
    import torch

    dest = tmp_path / "cache"
    # HF_ENDPOINT is how the pod (and a mirror) points huggingface_hub at another hub. HOME and HF_HOME are
    # unwritable, as in a pod with a read-only root filesystem: only --dest is written.
    unwritable = "/proc/gptd-no-such-dir"
    result = _cli(dest, env={"HF_ENDPOINT": hub.url, "HOME": unwritable, "HF_HOME": f"{unwritable}/hf"})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = _lines(result.stdout)
    expected = sorted(p.name for p in models["plain"].iterdir())
    total = sum((models["plain"] / n).stat().st_size for n in expected)
    assert all({"bytesDone", "bytesTotal", "filesDone", "filesTotal"} <= line.keys() for line in lines)
    assert all(line["bytesTotal"] == total and line["filesTotal"] == len(expected) for line in lines)
    done = [line["bytesDone"] for line in lines]
    assert done == sorted(done) and done[0] == 0 and done[-1] == total
    assert lines[-1]["complete"] is True and lines[-1]["revision"] == hub.last_sha
    assert lines[-1]["filesDone"] == len(expected)

    assert sorted(_resolved(hub)) == expected  # no .bin, onnx, flax, tf, gguf, README
    # One revision lookup, then only file transfers (no telemetry calls from a download Job).
    assert [r["path"] for r in hub.requests if "/resolve/" not in r["path"]] == [f"/api/models/{REPO_ID}/revision/main"]
    path = complete_revision(dest, hub.last_sha)
    assert path == dest / hub.last_sha and Path(lines[-1]["path"]) == path
    assert sorted(p.name for p in path.iterdir() if p.name != MARKER) == expected
    for name in expected:
        assert (path / name).read_bytes() == (models["plain"] / name).read_bytes()
    assert resolve_ref(dest, "main") == hub.last_sha
    assert not (dest / INCOMPLETE / hub.last_sha).exists()

    # The runtime's own loader takes the fetched directory, and it is the same model.
    settings = Settings(model=f"file://{path}", task="text-generation", device="cpu")
    fetched = load_model(settings, resolve_model_dir(settings))
    source = load_model(settings, models["plain"])
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.equal(fetched.model(ids).logits, source.model(ids).logits)

    # A revision already complete in the cache downloads nothing.
    hub.requests.clear()
    again = _cli(dest, env={"HF_ENDPOINT": hub.url})
    assert again.returncode == 0, again.stdout + again.stderr
    assert _resolved(hub) == [] and _lines(again.stdout)[-1]["complete"] is True


def test_bin_weights_are_fetched_when_there_are_no_safetensors(models: dict[str, Path], tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    src = models["plain"]
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.name != WEIGHTS}
    buf = io.BytesIO()
    torch.save(load_file(src / WEIGHTS), buf)
    files["pytorch_model.bin"] = buf.getvalue()
    with FakeHub() as hub:
        sha = hub.add_revision(REPO_ID, files)
        path = fetch(REPO_ID, "main", tmp_path, FetchOptions(endpoint=hub.url), out=io.StringIO())
    assert (path / "pytorch_model.bin").is_file() and not (path / WEIGHTS).exists()
    assert path == tmp_path / sha
    settings = Settings(model=str(path), task="text-generation", device="cpu")
    assert load_model(settings, path).model.config.n_layer == 2


def test_killed_download_resumes_without_refetching_completed_files_or_bytes(
        hub: FakeHub, models: dict[str, Path], tmp_path: Path) -> None:
    dest = tmp_path / "cache"
    size = (models["plain"] / WEIGHTS).stat().st_size
    cut = 1024 * 1024
    hub.stall_after[WEIGHTS] = cut
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptd_runtime", "fetch", REPO_ID, "--dest", str(dest)],
        cwd=REPO, env={**env, "HF_ENDPOINT": hub.url}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    work = dest / INCOMPLETE / hub.last_sha
    part = work / (WEIGHTS + ".part")
    others = sorted(p.name for p in models["plain"].iterdir() if p.name != WEIGHTS)
    deadline = time.monotonic() + 60
    try:
        # Files download in parallel: kill once the others are complete and the weights sit at the cut.
        while not (part.exists() and part.stat().st_size == cut and all((work / n).exists() for n in others)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, (
                "the partial file never reached the cut", part.exists() and part.stat().st_size,
                sorted(p.name for p in work.iterdir()) if work.exists() else None, hub.requests)
            time.sleep(0.05)
    finally:  # killed here on purpose, or because the wait failed: never left running
        proc.kill()
        proc.communicate(timeout=10)
    hub.release()

    # Killed mid-file: nothing looks complete.
    assert complete_revision(dest, hub.last_sha) is None and not (dest / hub.last_sha).exists()
    first_run_files = sorted(n for n in _resolved(hub) if n != WEIGHTS)
    assert first_run_files == others

    hub.requests.clear()
    hub.bytes_served.clear()
    lines: list[dict] = []
    out = io.StringIO()
    path = fetch(REPO_ID, "main", dest, FetchOptions(endpoint=hub.url, progress_interval=0), out=out)
    lines = _lines(out.getvalue())
    assert path == dest / hub.last_sha
    assert hub.bytes_served[WEIGHTS] == size - cut  # only the missing bytes
    assert [r["range"] for r in hub.requests if r["path"].endswith(WEIGHTS)] == [f"bytes={cut}-"]
    assert not set(first_run_files) & set(_resolved(hub))  # completed files not fetched again
    # Progress starts from what is on disk: the completed files plus the weights' first `cut` bytes.
    assert lines[0]["bytesDone"] - cut == sum((models["plain"] / n).stat().st_size for n in others)
    assert lines[0]["filesDone"] == len(others)
    assert (path / WEIGHTS).read_bytes() == (models["plain"] / WEIGHTS).read_bytes()


def test_dropped_connection_is_resumed_in_the_same_run(hub: FakeHub, models: dict[str, Path], tmp_path: Path) -> None:
    size = (models["plain"] / WEIGHTS).stat().st_size
    hub.drop_after[WEIGHTS] = 700_000
    path = fetch(REPO_ID, "main", tmp_path, FetchOptions(endpoint=hub.url, backoff_seconds=0), out=io.StringIO())
    assert hub.bytes_served[WEIGHTS] == size
    assert [r["range"] for r in hub.requests if r["path"].endswith(WEIGHTS)] == [None, "bytes=700000-"]
    assert (path / WEIGHTS).read_bytes() == (models["plain"] / WEIGHTS).read_bytes()


def test_corrupt_transfer_is_fetched_again(hub: FakeHub, models: dict[str, Path], tmp_path: Path) -> None:
    size = (models["plain"] / WEIGHTS).stat().st_size
    hub.corrupt[WEIGHTS] = 1
    path = fetch(REPO_ID, "main", tmp_path, FetchOptions(endpoint=hub.url, backoff_seconds=0), out=io.StringIO())
    assert hub.bytes_served[WEIGHTS] == 2 * size
    assert (path / WEIGHTS).read_bytes() == (models["plain"] / WEIGHTS).read_bytes()


def test_corrupt_files_left_on_disk_are_fetched_again(hub: FakeHub, models: dict[str, Path], tmp_path: Path) -> None:
    work = tmp_path / INCOMPLETE / hub.last_sha
    work.mkdir(parents=True)
    good = models["plain"]
    (work / WEIGHTS).write_bytes(b"x" * (good / WEIGHTS).stat().st_size)  # right size, wrong sha256
    (work / "tokenizer.json").write_bytes(b"{}")  # wrong size
    (work / "config.json").write_bytes((good / "config.json").read_bytes())  # good: kept
    path = fetch(REPO_ID, "main", tmp_path, FetchOptions(endpoint=hub.url), out=io.StringIO())
    assert WEIGHTS in _resolved(hub) and "tokenizer.json" in _resolved(hub)
    assert "config.json" not in _resolved(hub)
    for name in (WEIGHTS, "tokenizer.json", "config.json"):
        assert (path / name).read_bytes() == (good / name).read_bytes()


def test_always_corrupt_file_fails_and_publishes_nothing(hub: FakeHub, tmp_path: Path) -> None:
    hub.corrupt[WEIGHTS] = 100
    with pytest.raises(FetchError) as e:
        fetch(REPO_ID, "main", tmp_path, FetchOptions(endpoint=hub.url, attempts=3, backoff_seconds=0),
              out=io.StringIO())
    assert e.value.reason == "Corrupt" and WEIGHTS in e.value.message
    assert complete_revision(tmp_path, hub.last_sha) is None and not (tmp_path / hub.last_sha).exists()
    assert resolve_ref(tmp_path, "main") is None


def test_hub_errors_are_one_json_line_and_never_show_the_token(models: dict[str, Path], tmp_path: Path) -> None:
    secret = "hf_s3cr3t_token_value"
    token_file = tmp_path / "token"
    with FakeHub(token=secret) as hub:
        hub.add_directory(REPO_ID, models["plain"])
        dest = tmp_path / "cache"
        cases = [
            ({"HF_ENDPOINT": hub.url, "HF_TOKEN": secret}, "does-not-exist", "RevisionNotFound", "does-not-exist"),
            ({"HF_ENDPOINT": hub.url}, "main", "Unauthorized", "Invalid credentials"),
            ({"HF_ENDPOINT": hub.url, "HF_TOKEN": secret + "x"}, "main", "Unauthorized", "Invalid credentials"),
        ]
        for env, revision, reason, text in cases:
            result = _cli(dest, env=env, revision=revision)
            assert result.returncode == PERMANENT_EXIT_CODE, result.stdout  # no retry can fix these
            [line] = _lines(result.stdout)
            assert line["reason"] == reason and text in line["error"], line
            assert secret not in result.stdout + result.stderr

        result = _cli(dest, env={"HF_ENDPOINT": hub.url, "HF_TOKEN": secret}, uri="hf://acme/missing")
        [line] = _lines(result.stdout)
        assert result.returncode == PERMANENT_EXIT_CODE and line["reason"] == "RepositoryNotFound"
        assert "acme/missing" in line["error"]

        hub.gated.add(REPO_ID)
        token_file.write_text(secret + "\n")
        result = _cli(dest, "--token-file", str(token_file), env={"HF_ENDPOINT": hub.url})
        [line] = _lines(result.stdout)
        assert result.returncode == PERMANENT_EXIT_CODE and line["reason"] == "Forbidden", line
        assert "restricted" in line["error"], line

        hub.gated.clear()  # the token from the file is sent: the private repo downloads
        hub.requests.clear()
        result = _cli(dest, "--token-file", str(token_file), env={"HF_ENDPOINT": hub.url})
        assert result.returncode == 0, result.stdout + result.stderr
        assert secret not in result.stdout + result.stderr
        assert hub.requests and all(r["authorized"] for r in hub.requests)
    assert not list((dest / INCOMPLETE).glob("*/*.part"))


def test_disk_full_fails_with_a_clear_reason(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real ENOSPC from the kernel: the partial file is a link to /dev/full.
    work = tmp_path / "a" / INCOMPLETE / hub.last_sha
    work.mkdir(parents=True)
    (work / (WEIGHTS + ".part")).symlink_to("/dev/full")
    with pytest.raises(FetchError) as e:
        fetch(REPO_ID, "main", tmp_path / "a", FetchOptions(endpoint=hub.url), out=io.StringIO())
    assert e.value.reason == "DiskFull" and "No space left" in e.value.message and WEIGHTS in e.value.message
    assert complete_revision(tmp_path / "a", hub.last_sha) is None

    # Not enough free space for what is left: refused before any file is requested.
    hub.requests.clear()
    monkeypatch.setattr(fetch_mod.shutil, "disk_usage", lambda _: SimpleNamespace(total=10**9, used=10**9, free=1000))
    with pytest.raises(FetchError) as e:
        fetch(REPO_ID, "main", tmp_path / "b", FetchOptions(endpoint=hub.url), out=io.StringIO())
    assert e.value.reason == "DiskFull" and "1000 free" in e.value.message
    assert _resolved(hub) == []


def test_revision_directory_without_marker_is_not_complete_and_is_replaced(
        hub: FakeHub, models: dict[str, Path], tmp_path: Path) -> None:
    stale = tmp_path / hub.last_sha
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # e.g. a copy interrupted half-way: no marker
    assert complete_revision(tmp_path, hub.last_sha) is None
    path = fetch(REPO_ID, "main", tmp_path, FetchOptions(endpoint=hub.url), out=io.StringIO())
    assert path == stale and complete_revision(tmp_path, hub.last_sha) == stale
    assert (stale / "config.json").read_bytes() == (models["plain"] / "config.json").read_bytes()
    assert json.loads((stale / MARKER).read_text())["sha"] == hub.last_sha


def test_a_server_ignoring_range_makes_the_file_start_over(hub: FakeHub, models: dict[str, Path],
                                                          tmp_path: Path) -> None:
    size = (models["plain"] / WEIGHTS).stat().st_size
    hub.drop_after[WEIGHTS] = 700_000
    hub.ignore_range.add(WEIGHTS)
    path = fetch(REPO_ID, "main", tmp_path, FetchOptions(endpoint=hub.url, backoff_seconds=0), out=io.StringIO())
    assert [r["range"] for r in hub.requests if r["path"].endswith(WEIGHTS)] == [None, "bytes=700000-"]
    assert hub.bytes_served[WEIGHTS] == 700_000 + size  # the 200 answer was written from byte 0, not appended
    assert (path / WEIGHTS).read_bytes() == (models["plain"] / WEIGHTS).read_bytes()


def test_a_complete_pinned_sha_needs_no_hub_and_a_second_writer_is_refused(models: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    with FakeHub() as hub:
        sha = hub.add_directory(REPO_ID, models["plain"])
        work_lock = tmp_path / "b" / INCOMPLETE / f"{sha}.lock"
        work_lock.parent.mkdir(parents=True)
        with open(work_lock, "w") as held:  # another fetch of this revision is running
            fcntl.flock(held, fcntl.LOCK_EX)
            with pytest.raises(FetchError) as e:
                fetch(REPO_ID, "main", tmp_path / "b", FetchOptions(endpoint=hub.url), out=io.StringIO())
            assert e.value.reason == "Busy"
        assert not _resolved(hub)
        fetch(REPO_ID, "main", tmp_path / "a", FetchOptions(endpoint=hub.url), out=io.StringIO())
        endpoint = hub.url
    # The hub is gone: a pinned sha already in the cache is served from it; a branch needs the hub.
    out = io.StringIO()
    assert fetch(REPO_ID, sha, tmp_path / "a", FetchOptions(endpoint=endpoint), out=out) == tmp_path / "a" / sha
    assert _lines(out.getvalue())[-1]["complete"] is True
    with pytest.raises(FetchError) as e:
        fetch(REPO_ID, "main", tmp_path / "a", FetchOptions(endpoint=endpoint, timeout_seconds=5), out=io.StringIO())
    assert e.value.reason == "Network"


def test_a_corrupt_partial_file_is_caught_after_resuming_it(hub: FakeHub, models: dict[str, Path],
                                                            tmp_path: Path) -> None:
    size = (models["plain"] / WEIGHTS).stat().st_size
    work = tmp_path / INCOMPLETE / hub.last_sha
    work.mkdir(parents=True)
    (work / (WEIGHTS + ".part")).write_bytes(b"x" * 100_000)  # a bad prefix left by an earlier process
    path = fetch(REPO_ID, "main", tmp_path, FetchOptions(endpoint=hub.url, backoff_seconds=0), out=io.StringIO())
    # Resumed first (only the rest is sent), the hash over prefix + rest fails, then the whole file again.
    assert [r["range"] for r in hub.requests if r["path"].endswith(WEIGHTS)] == ["bytes=100000-", None]
    assert hub.bytes_served[WEIGHTS] == (size - 100_000) + size
    assert (path / WEIGHTS).read_bytes() == (models["plain"] / WEIGHTS).read_bytes()


def test_an_unusable_cache_directory_is_one_json_line(hub: FakeHub, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = _cli(not_a_dir / "cache", env={"HF_ENDPOINT": hub.url})
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = _lines(result.stdout)
    assert line["reason"] == "Storage" and str(not_a_dir) in line["error"], line
    assert "Traceback" not in result.stderr


def _in_thread(target: Any) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(target())
        except BaseException as e:
            box.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def _wait(predicate: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_files_download_in_parallel(hub: FakeHub, models: dict[str, Path], tmp_path: Path) -> None:
    hub.stall_after[WEIGHTS] = 100_000  # the weights hang mid-file ...
    thread, box = _in_thread(lambda: fetch(REPO_ID, "main", tmp_path, FetchOptions(endpoint=hub.url, jobs=4,
                                                                                    backoff_seconds=0),
                                           out=io.StringIO()))
    work = tmp_path / INCOMPLETE / hub.last_sha
    others = [p.name for p in models["plain"].iterdir() if p.name != WEIGHTS]
    # ... while every file after them in name order completes.
    _wait(lambda: all((work / n).exists() for n in others), "the other files did not complete meanwhile")
    hub.release()
    thread.join(30)
    assert box and box[0] == tmp_path / hub.last_sha, box
    assert [r["range"] for r in hub.requests if r["path"].endswith(WEIGHTS)] == [None, "bytes=100000-"]


def test_a_failing_file_stops_the_others(models: dict[str, Path], tmp_path: Path) -> None:
    with FakeHub() as hub:
        hub.add_directory(REPO_ID, models["plain"], extra={"tokenizer.model": b"spm" * 1000})  # an LFS file
        hub.corrupt["tokenizer.model"] = 100
        hub.stall_after[WEIGHTS] = 100_000
        opts = FetchOptions(endpoint=hub.url, jobs=4, attempts=2, backoff_seconds=0)
        thread, box = _in_thread(lambda: fetch(REPO_ID, "main", tmp_path, opts, out=io.StringIO()))
        _wait(lambda: hub.bytes_served["tokenizer.model"] == 2 * 3000, "no second attempt")
        _wait(lambda: hub.bytes_served[WEIGHTS] >= 100_000, "weights never started")
        time.sleep(0.5)  # the second failed verification is recorded before the stalled weights wake up
        hub.release()
        thread.join(30)
        assert isinstance(box[0], FetchError) and box[0].reason == "Corrupt" and "tokenizer.model" in box[0].message
        # The weights' connection broke after the failure: not resumed, since the revision cannot complete.
        assert [n for n in _resolved(hub) if n == WEIGHTS] == [WEIGHTS]


def test_a_revision_completed_by_another_fetch_meanwhile_is_kept(hub: FakeHub, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = fetch(REPO_ID, "main", tmp_path, FetchOptions(endpoint=hub.url), out=io.StringIO())
    marker = (path / MARKER).stat()
    real = fetch_mod.complete_revision
    calls: list[int] = []

    def racing(dest: Path, sha: str) -> Path | None:  # the first look happens before the other fetch finished
        calls.append(1)
        return None if len(calls) == 1 else real(dest, sha)

    monkeypatch.setattr(fetch_mod, "complete_revision", racing)
    hub.requests.clear()
    assert fetch(REPO_ID, "main", tmp_path, FetchOptions(endpoint=hub.url), out=io.StringIO()) == path
    assert _resolved(hub) == []  # nothing downloaded again
    assert (path / MARKER).stat().st_ino == marker.st_ino  # the complete revision was not replaced
    assert not (tmp_path / INCOMPLETE / hub.last_sha).exists()


def test_the_local_hub_also_serves_huggingface_hubs_own_snapshot_download(hub: FakeHub, models: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    # The emulator speaks the hub's API as huggingface_hub itself uses it (tree listing, HEAD + resolve):
    # what `serve --model hf://...` does today, and the peer in benchmarks/fetch_bench.py.
    from huggingface_hub import snapshot_download

    path = Path(snapshot_download(REPO_ID, cache_dir=tmp_path, endpoint=hub.url))
    assert path.name == hub.last_sha
    got = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    want = {p.name: p.read_bytes() for p in models["plain"].iterdir()} | EXTRAS
    assert got == want  # everything, extras included: it is not selective


def test_a_busy_hub_is_retried_at_the_revision_lookup_then_given_up(hub: FakeHub, tmp_path: Path) -> None:
    hub.api_failures[:] = [503, 429]
    path = fetch(REPO_ID, "main", tmp_path / "a", FetchOptions(endpoint=hub.url, backoff_seconds=0), out=io.StringIO())
    assert path.is_dir() and hub.api_failures == []
    lookups = [r for r in hub.requests if r["path"].startswith("/api/")]
    assert len(lookups) == 3

    hub.api_failures[:] = [503] * 10
    with pytest.raises(FetchError) as e:
        fetch(REPO_ID, "main", tmp_path / "b", FetchOptions(endpoint=hub.url, attempts=3, backoff_seconds=0),
              out=io.StringIO())
    assert e.value.reason == "HubError" and "503" in e.value.message and "temporarily unavailable" in e.value.message
    assert len(hub.api_failures) == 7  # three tries, no storm


def test_progress_lines_keep_coming_while_a_transfer_stalls(hub: FakeHub, tmp_path: Path) -> None:
    hub.stall_after[WEIGHTS] = 100_000
    out = io.StringIO()
    opts = FetchOptions(endpoint=hub.url, progress_interval=0.1, backoff_seconds=0)
    thread, box = _in_thread(lambda: fetch(REPO_ID, "main", tmp_path, opts, out=out))
    _wait(lambda: hub.bytes_served[WEIGHTS] >= 100_000, "the weights never started")
    time.sleep(0.3)  # the bytes received before the stall are counted
    before = len(out.getvalue().splitlines())
    time.sleep(1.0)  # nothing arrives meanwhile
    during = _lines(out.getvalue())[before:]
    hub.release()
    thread.join(30)
    assert box and isinstance(box[0], Path), box
    assert len(during) >= 5, during  # ~10 expected at 0.1 s
    assert len({line["bytesDone"] for line in during}) == 1  # a heartbeat: same figures, still reported


@pytest.mark.parametrize("bad_sha", ["../../victim", "/tmp/abs", "0" * 39 + "/", "A" * 40, "refs"])
def test_a_commit_sha_that_is_not_a_commit_id_is_refused_and_touches_nothing(
        hub: FakeHub, tmp_path: Path, bad_sha: str) -> None:
    dest = tmp_path / "cache" / "models"
    # What a path-shaped sha would reach: dest/<sha> (later rmtree'd when present) and dest/.incomplete/<sha>.
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    hub.reported_sha = bad_sha
    r = _cli(dest, env={"HF_ENDPOINT": hub.url})
    assert r.returncode == 1, r.stdout + r.stderr
    assert _lines(r.stdout) == [{"error": _lines(r.stdout)[0]["error"], "reason": "InvalidResponse"}]
    assert "invalid commit sha" in _lines(r.stdout)[0]["error"]
    assert (victim / "keep").read_text() == "x"
    assert not dest.exists() or not any(dest.rglob("*"))
    assert not [r for r in hub.requests if "/resolve/" in r["path"]]  # nothing downloaded


@pytest.mark.parametrize("revision", ["../../x", "../refs2/x", "ABSOLUTE", "a/../../x", ".", ""])
def test_a_revision_whose_ref_leaves_dest_refs_is_refused_before_the_hub_is_asked(
        hub: FakeHub, tmp_path: Path, revision: str) -> None:
    dest = tmp_path / "cache" / "models"
    revision = str(tmp_path / "x") if revision == "ABSOLUTE" else revision
    hub.repos[REPO_ID].refs[revision] = hub.last_sha  # even a hub that knows the ref gets no say
    r = _cli(dest, env={"HF_ENDPOINT": hub.url}, revision=revision)
    assert r.returncode == PERMANENT_EXIT_CODE, r.stdout + r.stderr  # a bad argument: no retry
    [line] = _lines(r.stdout)
    assert line["reason"] == "InvalidArgument" and "revision" in line["error"], line
    assert hub.requests == []
    assert not (tmp_path / "x").exists() and not (dest / "refs2").exists() and not (tmp_path / "cache" / "x").exists()
    assert not dest.exists() or not any(dest.rglob("*"))
    with pytest.raises(FetchError) as e:
        resolve_ref(dest, revision)
    assert e.value.reason == "InvalidArgument"


def test_a_nested_revision_such_as_a_pr_ref_stays_allowed(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos[REPO_ID].refs["refs/pr/1"] = hub.last_sha
    path = fetch(REPO_ID, "refs/pr/1", tmp_path, FetchOptions(endpoint=hub.url, backoff_seconds=0), out=io.StringIO())
    assert path == tmp_path / hub.last_sha and resolve_ref(tmp_path, "refs/pr/1") == hub.last_sha


def test_result_file_holds_the_last_line_for_the_operator(hub: FakeHub, tmp_path: Path) -> None:
    """The download Job's container writes it to /dev/termination-log: the commit sha, or the error."""
    dest, result_file = tmp_path / "cache", tmp_path / "termination-log"
    ok = _cli(dest, "--result-file", str(result_file), env={"HF_ENDPOINT": hub.url})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    line = json.loads(result_file.read_text())
    assert line == _lines(ok.stdout)[-1] and line["revision"] == hub.last_sha and line["complete"] is True
    bad = _cli(dest, "--result-file", str(result_file), env={"HF_ENDPOINT": hub.url}, revision="nope")
    assert bad.returncode == PERMANENT_EXIT_CODE  # revision not found: no retry can fix it
    assert json.loads(result_file.read_text()) == _lines(bad.stdout)[-1] and "nope" in _lines(bad.stdout)[-1]["error"]


def _run(dest: Path, endpoint: str, revision: str, *extra: str) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    fetch_mod.add_arguments(parser)
    args = parser.parse_args([f"hf://{REPO_ID}", "--revision", revision, "--dest", str(dest),
                              "--progress-interval", "0", *extra])
    out = io.StringIO()
    rc = fetch_mod.run(args, out=out)
    print(out.getvalue())  # shown when the test fails
    return rc


def test_prune_keeps_the_mounted_and_the_fetched_revisions_and_no_running_work(
        models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "cache"
    import functools

    with FakeHub() as hub:
        # The CLI in-process (a subprocess per fetch would cost seconds of imports): HF_ENDPOINT's part.
        monkeypatch.setattr(fetch_mod, "FetchOptions", functools.partial(FetchOptions, endpoint=hub.url))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        shas = {}
        for tag, extra in (("v1", b"1"), ("v2", b"2"), ("v3", b"3")):
            shas[tag] = hub.add_directory(REPO_ID, models["plain"], ref=tag, extra={"notes.txt": extra})
            assert _run(dest, hub.url, tag) == 0
        # Abandoned work (a killed fetch) and work a running fetch holds the lock of.
        stale, busy = "a" * 40, "b" * 40
        for sha in (stale, busy):
            (dest / INCOMPLETE / sha).mkdir(parents=True)
            (dest / INCOMPLETE / sha / "model.safetensors.part").write_bytes(b"x")
        with open(dest / INCOMPLETE / f"{busy}.lock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            shas["v4"] = hub.add_directory(REPO_ID, models["plain"], ref="v4", extra={"notes.txt": b"4"})
            # v1 is mounted by running pods: kept; v4 is the one fetched now: kept; v2, v3 go.
            assert _run(dest, hub.url, "v4", "--prune", "--keep", shas["v1"]) == 0
            assert complete_revision(dest, shas["v1"]) and complete_revision(dest, shas["v4"])
            assert not (dest / shas["v2"]).exists() and not (dest / shas["v3"]).exists()
            assert resolve_ref(dest, "v1") == shas["v1"] and resolve_ref(dest, "v4") == shas["v4"]
            assert resolve_ref(dest, "v2") is None and not (dest / "refs" / "v3").exists()
            assert not (dest / INCOMPLETE / stale).exists()
            assert (dest / INCOMPLETE / busy / "model.safetensors.part").exists()  # a running fetch's: untouched
        # Without --prune nothing is deleted.
        assert _run(dest, hub.url, "v2") == 0
        assert complete_revision(dest, shas["v1"]) and complete_revision(dest, shas["v2"])
        assert _run(dest, hub.url, "v2", "--prune", "--keep", "not-a-sha") == PERMANENT_EXIT_CODE


def test_the_operators_download_job_command_runs_fetch_and_its_result_pins_the_pods(
        hub: FakeHub, tmp_path: Path) -> None:
    """The contract between the two halves of issue 10: the command line the operator builds for the download Job,
    run as the kubelet would (the claim's mount and /dev/termination-log mapped into tmp_path), prints progress the
    operator parses, and its termination message gives the commit the pods' GPTD_MODEL then points at."""
    from gptd_operator import builders, model_cache
    from gptd_operator.api import parse_spec
    from gptd_operator.observe import JobObs
    from gptd_operator.settings import Settings as OperatorSettings

    spec = parse_spec({"model": {"uri": f"hf://{REPO_ID}", "revision": "main", "cache": {"size": "1Gi"}}})
    settings = OperatorSettings()
    template = builders.revision_template(spec, settings)
    revision = builders.revision_hash(template)
    job = model_cache.build_job("gpt2", "ns", "uid", spec, settings, revision=revision, template=template, attempt=1,
                                keep=["f" * 40])
    (container,) = job["spec"]["template"]["spec"]["containers"]
    cache, termination = tmp_path / "claim", tmp_path / "termination-log"
    mapped = {builders.MODEL_CACHE_DIR: str(cache), model_cache.RESULT_FILE: str(termination)}
    command = [mapped.get(arg, arg) for arg in container["command"]]
    assert command[:3] == ["python", "-m", "gptd_runtime"]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "GPTD_HF_TOKEN_FILE")}
    env.update({e["name"]: e["value"] for e in container["env"] if "value" in e}, HF_ENDPOINT=hub.url)
    env.update(HOME=str(tmp_path / "home"), HF_HOME=str(tmp_path / "home" / "hf"))
    done = subprocess.run([sys.executable, *command[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    progress = model_cache.parse_progress(done.stdout)
    assert progress is not None and progress["bytesDone"] == progress["bytesTotal"] > 0
    finished = JobObs(name=job["metadata"]["name"], revision=revision, purpose=model_cache.COMPONENT, succeeded=1,
                      conditions=(("Complete", "True", "", ""),), exit_code=0, message=termination.read_text())
    plan = model_cache.plan_download("gpt2", "ns", "uid", spec, settings, revision=revision, template=template,
                                     previous_status={}, jobs=(finished,), progress=None, templates=(), now=dt_now())
    assert plan.sha == hub.last_sha and plan.wait is None
    pod = builders.build_pod_template("gpt2", spec, settings, builders.with_resolved(template, plan.sha), "stable")
    model_env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}["GPTD_MODEL"]
    loaded = Path(model_env.removeprefix("file://").replace(builders.MODEL_CACHE_DIR, str(cache)))
    assert complete_revision(cache, plan.sha) == loaded


def dt_now() -> Any:
    import datetime

    return datetime.datetime.now(datetime.UTC)
