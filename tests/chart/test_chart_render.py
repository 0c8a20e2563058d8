"""The Helm chart: lint, render, Kubernetes schema validation, values schema, RBAC, pod security, single replica."""

from __future__ import annotations

import json
import re
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support.chart import CHART, K8S_VERSIONS, NAMESPACE, ROOT, assert_restricted, by_kind, one, run_helm

VARIANTS = {
    "default": (),
    "namespaced": ("--set", "watchNamespaces={team-a,team-b}"),
    "no-crds": ("--set", "crds.enabled=false", "--set", "crds.keep=false"),
    "keda-custom": (
        "--set", "scaleToZeroProvider=keda",
        "--set", "prometheusUrl=http://prometheus-operated.monitoring:9090",
        "--set", "s3InitImage=public.ecr.aws/aws-cli/aws-cli:2.27.0",
        "--set", "resyncSeconds=10",
        "--set", "prestopSleepSeconds=3",
        "--set", "verbose=true",
        "--set", "runtime.image=registry.local/gptd-runtime:dev",
        "--set", "image.tag=dev",
        "--set", "serviceAccount.create=false", "--set", "serviceAccount.name=existing-sa",
    ),
}


def _deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = _deployment(docs)["spec"]["template"]["spec"]["containers"]
    return container


def _env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(docs)["env"]}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint(helm_bin, variant):
    proc = run_helm(helm_bin, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *VARIANTS[variant])
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("k8s", K8S_VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_objects_validate_against_kubernetes_schemas(render, variant, k8s):
    docs = render(*VARIANTS[variant])
    assert docs
    for doc in docs:
        # strict: unknown fields (typos in templates) are errors too.
        kubernetes_validate.validate(doc, k8s, strict=True)


@pytest.mark.parametrize(
    "bad",
    [
        ("--set", "foo=bar"),
        ("--set", "image.foo=bar"),
        ("--set", "crds.foo=true"),
        ("--set", "resources.foo=1"),
        ("--set", "replicaCount=2"),
        ("--set", "scaleToZeroProvider=knative"),
        ("--set", "watchNamespaces={Not_A_Namespace}"),
        ("--set", "scaleToZeroProvider=keda"),  # keda without prometheusUrl: minReplicas 0 could never work
        ("--set", "prometheusUrl=prometheus:9090"),
        ("--set", "resyncSeconds=0"),
        ("--set", "prestopSleepSeconds=-1"),
        ("--set", "verbose=yes"),
    ],
    ids=lambda a: a[1],
)
@pytest.mark.parametrize("command", ["lint", "template"])
def test_values_schema_rejects_bad_values(helm_bin, command, bad):
    proc = run_helm(helm_bin, command, "gptd", str(CHART), *bad, check=False) if command == "template" else (
        run_helm(helm_bin, "lint", str(CHART), *bad, check=False)
    )
    assert proc.returncode != 0, proc.stdout
    assert "schema" in (proc.stderr + proc.stdout).lower()


def test_values_schema_forbids_unknown_keys_everywhere():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path}: additionalProperties must be false"
        for key, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(schema, "values")


def test_every_value_is_documented_and_in_the_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    values = yaml.safe_load("\n".join(lines))
    stack: list[tuple[int, str]] = []
    seen: set[str] = set()
    documented: set[str] = set()
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][\w.-]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        path = f"{parent}.{key}" if parent else key
        stack.append((indent, path))
        node: dict[str, Any] | None = schema
        for part in path.split("."):
            node = (node or {}).get("properties", {}).get(part)
        if node is None:
            continue  # inside a free-form map (e.g. resources.requests.cpu): a default, not a chart key
        seen.add(path)
        previous = lines[i - 1].strip() if i else ""
        if previous.startswith("#"):
            documented.add(path)
        elif rest == "" and "properties" in node:
            continue  # uncommented section header (image:): each of its keys carries a comment
        else:  # a key inside a documented block (resources.requests) is covered by the block's comment
            assert parent in documented, f"values.yaml: {path} has no comment above it"
    top = set(schema["properties"])
    assert top == set(values), f"values.yaml and schema disagree: {top ^ set(values)}"
    for section, node in schema["properties"].items():
        for key in node.get("properties", {}):
            if values.get(section) and isinstance(values[section], dict):  # empty {} maps: free-form
                assert f"{section}.{key}" in seen, f"{section}.{key} is in the schema but not in values.yaml"


def test_single_active_operator(render, helm_bin):
    dep = _deployment(render())
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert _deployment(render("--set", "replicaCount=0"))["spec"]["replicas"] == 0
    proc = run_helm(helm_bin, "template", "gptd", str(CHART), "--set", "replicaCount=2", check=False)
    assert proc.returncode != 0 and "replicaCount" in proc.stderr


def test_operator_container(render):
    docs = render()
    c = _container(docs)
    assert c["image"] == "ghcr.io/gptd-io/gptd-operator:" + yaml.safe_load((CHART / "Chart.yaml").read_text())[
        "appVersion"
    ]
    assert c["command"] == ["python", "-m", "gptd_operator"]
    assert c["args"] == ["--liveness=http://0.0.0.0:8080/healthz"]
    probe = c["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert probe["port"] in ports and ports[probe["port"]] == 8080
    env = _env(docs)
    assert env["GPTD_RUNTIME_IMAGE"] == "ghcr.io/gptd-io/gptd-runtime:0.1.0"
    assert env["GPTD_SCALE_TO_ZERO_PROVIDER"] == ""
    assert env["GPTD_PROMETHEUS_URL"] == "" and env["GPTD_S3_INIT_IMAGE"] == ""


def _operator_settings_env_vars() -> set[str]:
    """Every GPTD_* variable the operator's Settings.from_env reads (from its source, not a copy of the list)."""
    import inspect

    from gptd_operator.settings import Settings

    return set(re.findall(r"env\.get\(\"(GPTD_[A-Z0-9_]+)\"", inspect.getsource(Settings.from_env)))


def test_every_operator_setting_is_a_chart_value(render):
    """Each setting the operator reads is rendered from a value (GPTD_NAMESPACES is --namespace from
    watchNamespaces, which wins over it)."""
    names = _operator_settings_env_vars()
    assert {"GPTD_RUNTIME_IMAGE", "GPTD_PROMETHEUS_URL", "GPTD_S3_INIT_IMAGE"} <= names
    for variant in VARIANTS.values():
        rendered = {e["name"] for e in _container(render(*variant))["env"]}
        assert names - {"GPTD_NAMESPACES"} <= rendered
        assert all(n in names for n in rendered if n.startswith("GPTD_")), "the chart sets a variable nobody reads"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_operator_settings_parse_the_rendered_env(render, variant):
    """The rendered env is what the operator's own Settings.from_env accepts (empty strings mean unset)."""
    from gptd_operator.settings import Settings

    settings = Settings.from_env({k: v for k, v in _env(render(*VARIANTS[variant])).items() if isinstance(v, str)})
    if variant == "keda-custom":
        assert settings == Settings(
            runtime_image="registry.local/gptd-runtime:dev",
            scale_to_zero_provider="keda",
            prometheus_url="http://prometheus-operated.monitoring:9090",
            s3_init_image="public.ecr.aws/aws-cli/aws-cli:2.27.0",
            resync_seconds=10,
            prestop_sleep_seconds=3,
        )
    else:
        assert settings == Settings()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_operator_cli_accepts_the_rendered_args(render, variant):
    """The chart's args are the operator's real CLI (its argparse parser), not a guess."""
    from gptd_operator.__main__ import _parser

    c = _container(render(*VARIANTS[variant]))
    assert c["command"][-2:] == ["-m", "gptd_operator"]
    args = _parser().parse_args(c["args"])
    assert args.command is None  # the default command: run the operator
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    expected = {"namespaced": ["team-a", "team-b"]}.get(variant)
    assert args.namespace == expected


def test_values_reach_the_operator(render):
    from gptd_operator.__main__ import _parser

    docs = render(*VARIANTS["keda-custom"])
    c = _container(docs)
    assert c["image"] == "ghcr.io/gptd-io/gptd-operator:dev"
    assert c["args"] == ["--liveness=http://0.0.0.0:8080/healthz", "--verbose"]
    assert _parser().parse_args(c["args"]).verbose is True
    env = _env(docs)
    assert env["GPTD_RUNTIME_IMAGE"] == "registry.local/gptd-runtime:dev"
    assert env["GPTD_SCALE_TO_ZERO_PROVIDER"] == "keda"
    assert env["GPTD_PROMETHEUS_URL"] == "http://prometheus-operated.monitoring:9090"
    assert env["GPTD_S3_INIT_IMAGE"] == "public.ecr.aws/aws-cli/aws-cli:2.27.0"
    assert env["GPTD_RESYNC_SECONDS"] == "10" and env["GPTD_PRESTOP_SLEEP_SECONDS"] == "3"
    assert not by_kind(docs, "ServiceAccount")
    assert _deployment(docs)["spec"]["template"]["spec"]["serviceAccountName"] == "existing-sa"
    (crb,) = by_kind(docs, "ClusterRoleBinding")
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": "existing-sa", "namespace": NAMESPACE}]


def test_pod_security_restricted(render):
    for variant in VARIANTS.values():
        docs = render(*variant)
        dep = _deployment(docs)
        spec = dep["spec"]["template"]["spec"]
        assert_restricted(spec, "operator")
        (c,) = spec["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["runAsUser"] == 10001
        for pod in by_kind(docs, "Pod"):
            assert_restricted(pod["spec"], pod["metadata"]["name"])


def test_helm_test_hook_probes_liveness_through_the_service(render):
    docs = render()
    (pod,) = by_kind(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    svc = one(docs, "Service")
    dep = _deployment(docs)
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    script = pod["spec"]["containers"][0]["command"][-1]
    assert f"http://{svc['metadata']['name']}:8080/healthz" in script
    assert pod["spec"]["containers"][0]["image"] == _container(docs)["image"]
    assert not by_kind(render("--set", "tests.enabled=false"), "Pod")
    # The Service must not select the test pod itself (it would probe its own closed port), and hack/demo.sh
    # finds a failed test pod by these labels to print its logs.
    assert not svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {"app.kubernetes.io/instance": "gptd", "app.kubernetes.io/component": "test"}.items() <= (
        pod["metadata"]["labels"].items())
    assert "-l app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=test" in (
        ROOT / "hack" / "demo.sh").read_text().replace('"', "")


# ------------------------------------------------------------------------------------------------- RBAC

# Exactly the calls in docs/operator.md "RBAC needs" (the tests below also parse that table).
CHILD_VERBS = {"list", "watch", "get", "create", "patch", "delete"}
EXPECTED_NAMESPACED = {
    ("", "events"): {"create"},
    ("gptd.io", "gptdeployments"): {"list", "watch", "get", "patch"},
    ("gptd.io", "gptdeployments/status"): {"patch"},
    # blockOwnerDeletion under OwnerReferencesPermissionEnforcement (OpenShift): the one `update` granted.
    ("gptd.io", "gptdeployments/finalizers"): {"update"},
    ("apps", "deployments"): CHILD_VERBS,
    ("policy", "poddisruptionbudgets"): CHILD_VERBS,
    ("autoscaling", "horizontalpodautoscalers"): CHILD_VERBS,
    ("", "services"): {"list", "watch", "get", "create", "patch"},
    ("", "pods"): {"list", "watch"},
    # Issue 12: the NetworkPolicy child (watched); the cert-manager Certificate (read live, never listed).
    ("networking.k8s.io", "networkpolicies"): CHILD_VERBS,
    ("cert-manager.io", "certificates"): {"get", "create", "patch", "delete"},
    # Issues 10/11: Jobs (download, evaluation) and the model cache claim, watched; a download's progress lines.
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "persistentvolumeclaims"): {"get", "list", "watch", "create", "patch"},
    ("", "pods/log"): {"get"},
    # Issue 11: the evaluation gate sets the pod condition gptd.io/evaluated; it reads the dataset ConfigMap.
    ("", "pods/status"): {"patch"},
    ("", "configmaps"): {"get"},
}
KEDA = {("keda.sh", "scaledobjects"): {"get", "create", "patch", "delete"}}


def _grants(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource), rule
                forbidden = {"*", "escalate", "bind", "impersonate"} | (
                    set() if (group, resource) == ("gptd.io", "gptdeployments/finalizers") else {"update"})
                assert not set(rule["verbs"]) & forbidden, rule
                assert (group, resource) not in out, f"{(group, resource)} in two rules"
                out[(group, resource)] = set(rule["verbs"])
    return out


def _documented_rbac() -> tuple[dict[tuple[str, str], set[str]], dict[tuple[str, str], set[str]]]:
    """docs/operator.md's "RBAC needs" table: (always, keda-only) grants."""
    text = (ROOT / "docs" / "operator.md").read_text()
    table = text.split("### RBAC needs", 1)[1].split("\n\n", 2)[1]
    always: dict[tuple[str, str], set[str]] = {}
    keda: dict[tuple[str, str], set[str]] = {}
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        group, resource = re.findall(r"`([^`]*)`", cells[0])
        group = "" if group == '""' else group
        verbs = set(re.findall(r"`(\w+)`", cells[1]))
        target = keda if "keda" in cells[2].lower() else always
        target.setdefault((group, resource), set()).update(verbs)
    return always, keda


def test_rbac_expectations_are_the_documented_needs():
    always, keda = _documented_rbac()
    assert always == EXPECTED_NAMESPACED
    assert keda == KEDA


def test_rbac_covers_what_kopf_watches_and_nothing_cluster_scoped():
    """Every resource the operator's kopf handlers watch/index gets list+watch; the operator turns kopf's
    scanning off, so kopf never lists/watches CustomResourceDefinitions or Namespaces (kopf 1.45
    _core/reactor/observation.py: both observers skip their list/watch when settings.scanning.disabled;
    resources come from the /api + /apis discovery documents, readable by every authenticated user)."""
    import kopf
    from gptd_operator import handlers, kube
    from gptd_operator.settings import Settings

    registry = kopf.OperatorRegistry()
    settings = Settings()
    handlers.register(registry, settings, handlers.Reconciler(settings, kube.Kube(kube.Config(server="https://x"))))
    (configure,) = [h for h in registry._activities.get_all_handlers() if h.id == "configure_kopf"]
    kopf_settings = kopf.OperatorSettings()
    configure.fn(settings=kopf_settings)
    assert kopf_settings.scanning.disabled is True
    watched = {
        (h.selector.group or "", h.selector.any_name or h.selector.plural)
        for h in [*registry._indexing.get_all_handlers(), *registry._watching.get_all_handlers(),
                  *registry._changing.get_all_handlers()]
    }
    assert watched == {("gptd.io", "gptdeployments"), ("apps", "deployments"), ("", "services"),
                       ("policy", "poddisruptionbudgets"), ("autoscaling", "horizontalpodautoscalers"), ("", "pods"),
                       ("networking.k8s.io", "networkpolicies"), ("batch", "jobs"), ("", "persistentvolumeclaims")}
    for key in watched:
        assert {"list", "watch"} <= EXPECTED_NAMESPACED[key], key


def test_rbac_clusterwide_least_privilege(render):
    docs = render()
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    role = one(docs, "ClusterRole")
    assert _grants(role) == EXPECTED_NAMESPACED
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    sa = one(docs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    assert _deployment(docs)["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_rbac_namespaced(render):
    docs = render(*VARIANTS["namespaced"])
    # Nothing cluster-scoped: no CRD or Namespace access (kopf's scanning is off), all else per namespace.
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    roles = {r["metadata"]["namespace"]: r for r in by_kind(docs, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(docs, "RoleBinding")}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    for ns, role in roles.items():
        assert _grants(role) == EXPECTED_NAMESPACED, ns
        assert bindings[ns]["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]
        }
        assert bindings[ns]["subjects"][0]["namespace"] == NAMESPACE
    assert _container(docs)["args"][1:] == ["--namespace=team-a", "--namespace=team-b"]


def test_rbac_keda_adds_only_scaledobjects(render):
    grants = _grants(one(render(*VARIANTS["keda-custom"]), "ClusterRole"))
    assert grants == {**EXPECTED_NAMESPACED, **KEDA}
    docs = render("--set", "watchNamespaces={team-a}", "--set", "scaleToZeroProvider=keda",
                  "--set", "prometheusUrl=http://prometheus:9090")
    assert _grants(one(docs, "Role")) == {**EXPECTED_NAMESPACED, **KEDA}


def test_notes_tell_the_next_command(helm_bin):
    proc = run_helm(helm_bin, "install", "gptd", str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "kubectl apply -f" in notes and "manifests/samples/cpu.yaml" in notes
    # cpu.yaml serves pvc://demo-model/demo: the PVC and its Job come first.
    assert notes.index("manifests/samples/demo-model.yaml") < notes.index("manifests/samples/cpu.yaml")
    assert "kubectl wait --for=condition=complete job/demo-model" in notes
    assert "kubectl get gptd" in notes
    assert "kubectl wait --for=condition=Ready gptd/demo" in notes
