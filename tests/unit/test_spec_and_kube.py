"""Spec validation messages name the field; kube's pure comparison helpers; settings from env."""

from __future__ import annotations

from typing import Any

import pytest
from gptd_operator import kube, normalize
from gptd_operator.api import InvalidSpec, parse_spec
from gptd_operator.settings import DEFAULT_RUNTIME_IMAGE, Settings

OK = {"model": {"uri": "hf://openai-community/gpt2"}}


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"model": {"uri": "ftp://x"}}, "spec.model.uri"),
        ({"model": {}}, "spec.model.uri"),
        ({"replicas": -1}, "spec.replicas"),
        ({"replica": 2}, "spec.replica"),
        ({"resources": {"gpus": 17}}, "spec.resources.gpus"),
        ({"resources": {"memory": "lots"}}, "spec.resources.memory"),
        ({"runtime": {"maxBatchSize": 0}}, "spec.runtime.maxBatchSize"),
        ({"runtime": {"env": [{"name": "1BAD"}]}}, "spec.runtime.env[0].name"),
        ({"service": {"port": 70000}}, "spec.service.port"),
        ({"autoscaling": {"maxReplicas": 1, "minReplicas": 3, "targetInflightRequests": 1}}, "spec.autoscaling"),
        ({"autoscaling": {"maxReplicas": 2}}, "spec.autoscaling"),
        ({"rollout": {"maxSurge": 0, "maxUnavailable": 0}}, "spec.rollout"),
        ({"rollout": {"strategy": "Canary"}}, "spec.rollout"),
    ],
)
def test_bad_spec_names_the_field(patch: dict[str, Any], field: str) -> None:
    raw = {**OK, **patch}
    with pytest.raises(InvalidSpec) as err:
        parse_spec(raw)
    assert err.value.field == field
    assert str(err.value).startswith(field)


def test_good_spec_defaults() -> None:
    spec = parse_spec(OK)
    assert (spec.replicas, spec.resources.gpus, spec.service.port, spec.model.revision) == (1, 1, 8000, "main")


def test_is_subset_semantics() -> None:
    live = {"a": 1, "extra": 2, "l": [{"x": 1, "default": "d"}], "selector": {"k": "v"}}
    assert normalize.is_subset({"a": 1, "l": [{"x": 1}]}, live)
    assert not normalize.is_subset({"a": 2}, live)
    assert not normalize.is_subset({"l": [{"x": 1}, {"x": 2}]}, live)
    assert normalize.is_subset({"missing": None}, live)
    assert not normalize.is_subset({"a": None}, live)
    # Exact maps: an added key is a difference.
    assert normalize.is_subset({"selector": {"k": "v"}}, live)
    assert not normalize.is_subset({"selector": {"k": "v"}}, {"selector": {"k": "v", "hijack": "1"}})
    # Quantities compare by value under limits/requests, nowhere else.
    assert normalize.is_subset({"limits": {"cpu": "0.5", "memory": "1.5Gi"}},
                          {"limits": {"cpu": "500m", "memory": "1536Mi"}})
    assert not normalize.is_subset({"limits": {"cpu": "1"}}, {"limits": {"cpu": "500m"}})
    assert not normalize.is_subset({"value": "0.5"}, {"value": "500m"})


def test_with_removals_nulls_added_keys_in_exact_maps() -> None:
    desired = {"spec": {"selector": {"k": "v"}, "other": {"a": 1}}}
    live = {"spec": {"selector": {"k": "v", "hijack": "1"}, "other": {"a": 1, "b": 2}}}
    want = {"spec": {"selector": {"k": "v", "hijack": None}, "other": {"a": 1}}}
    assert normalize.with_removals(desired, live) == want


def test_quantity() -> None:
    assert normalize.quantity("500m") == normalize.quantity("0.5")
    assert normalize.quantity("1Gi") == 2**30
    assert normalize.quantity("lots") is None


def test_resource_paths() -> None:
    assert kube.DEPLOYMENTS.path("ns", "x") == "/apis/apps/v1/namespaces/ns/deployments/x"
    assert kube.SERVICES.path("ns") == "/api/v1/namespaces/ns/services"
    path = kube.GPTDEPLOYMENTS.path("ns", "g", "status")
    assert path == "/apis/gptd.io/v1alpha1/namespaces/ns/gptdeployments/g/status"


def test_strip_none() -> None:
    assert normalize.strip_none({"a": None, "b": [{"c": None, "d": 1}]}) == {"b": [{"d": 1}]}


def test_settings_from_env() -> None:
    s = Settings.from_env({})
    assert s.runtime_image == DEFAULT_RUNTIME_IMAGE and s.namespaces == () and s.scale_to_zero_provider is None
    s = Settings.from_env({"GPTD_RUNTIME_IMAGE": "r:1", "GPTD_NAMESPACES": "a, b",
                           "GPTD_SCALE_TO_ZERO_PROVIDER": "KEDA", "GPTD_S3_INIT_IMAGE": "aws:2",
                           "GPTD_RESYNC_SECONDS": "5"})
    assert (s.runtime_image, s.namespaces, s.scale_to_zero_provider, s.s3_init_image, s.resync_seconds) == (
        "r:1", ("a", "b"), "keda", "aws:2", 5.0)
    with pytest.raises(ValueError):
        Settings.from_env({"GPTD_SCALE_TO_ZERO_PROVIDER": "magic"})


def test_load_config_from_kubeconfig(tmp_path: Any) -> None:
    path = tmp_path / "kc"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'http://127.0.0.1:1234'}}]\n"
        "users: [{name: u, user: {token: abc}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    cfg = kube.load_config(str(path))
    assert cfg.server == "http://127.0.0.1:1234"
    assert cfg.auth_header() == "Bearer abc"
    info = kube.connection_info(cfg)
    assert (info.server, info.scheme, info.token) == ("http://127.0.0.1:1234", "Bearer", "abc")


def test_docs_example_is_valid() -> None:
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[2] / "docs" / "operator.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    obj = yaml.safe_load(block)
    assert obj["kind"] == "GPTDeployment"
    spec = parse_spec(obj["spec"])
    assert spec.autoscaling is not None and spec.model.hfTokenSecretRef is not None


class _RejectingKube:
    """A kube.Kube stand-in whose API server refuses every Deployment with a 422, as for a bad affinity."""

    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.applied: list[str] = []

    async def get(self, res: kube.Resource, namespace: str, name: str) -> dict[str, Any] | None:
        return {"metadata": {"name": name, "namespace": namespace, "uid": "u1"}}

    async def apply(self, desired: dict[str, Any], live: Any) -> tuple[str, dict[str, Any]]:
        self.applied.append(desired["kind"])
        raise kube.ApiError(
            422,
            'Deployment.apps "m" is invalid: spec.template.spec.affinity.nodeAffinity.'
            "requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms: Required value",
        )

    async def patch(self, res: kube.Resource, namespace: str, name: str, patch: dict[str, Any], **_: Any) -> None:
        self.patches.append(patch)


async def test_api_server_rejection_is_invalid_spec_not_a_retry_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    from gptd_operator import handlers

    events: list[dict[str, Any]] = []
    monkeypatch.setattr(handlers.kopf, "event", lambda body, **kw: events.append(kw))
    fake = _RejectingKube()
    rec = handlers.Reconciler(Settings(), fake)  # type: ignore[arg-type]
    body = {
        "metadata": {"name": "m", "namespace": "ns", "uid": "u1", "generation": 1},
        "spec": {**OK, "scheduling": {"affinity": {"nodeAffinity": {"bogus": {}}}}},
    }
    await rec.reconcile(body, {})  # must not raise: kopf would retry it forever
    assert fake.applied == ["Deployment"]  # stopped at the first refusal: nothing else created
    (patch,) = fake.patches
    ready = next(c for c in patch["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert ready["message"].startswith("spec.scheduling.affinity: the API server rejected Deployment m")
    assert patch["status"]["phase"] == "Failed"
    assert [e["reason"] for e in events] == ["InvalidSpec"]
    await rec.reconcile(body, {})  # same refusal again: no second write, no second Event
    assert len(fake.patches) == 1 and len(events) == 1


def test_api_error_keeps_the_status_message() -> None:
    err = kube.ApiError(422, "spec.x: Invalid value")
    assert err.status == 422 and err.message == "spec.x: Invalid value"


@pytest.mark.parametrize(
    "patch",
    [
        {"runtime": {"env": [{"name": "HF_TOKEN", "value": 123456789}]}},
        {"runtime": {"apiKeySecretRef": "sk-live-abcdef"}},
        {"model": {"uri": "hf://org/m", "hfTokenSecretRef": {"name": "hf", "key": 987654321}}},
    ],
)
def test_a_misplaced_secret_is_not_echoed(patch: dict[str, Any]) -> None:
    with pytest.raises(InvalidSpec) as err:
        parse_spec({**OK, **patch})
    assert not any(s in str(err.value) for s in ("123456789", "sk-live-abcdef", "987654321"))
