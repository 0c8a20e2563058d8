"""The one version number: ``pyproject.toml``'s ``[project].version``. Everything that names a release follows it.

    python hack/version.py            # print it
    python hack/version.py --check    # exit 1 (and say where) when anything disagrees with it
    python hack/version.py --set 0.2.0  # rewrite every place below, then run `make generate`

Followers: the chart's ``version`` and ``appVersion`` (the operator image's default tag: ``image.tag`` is empty),
its default ``runtime.image`` and the operator's built-in default runtime image, the runtime package's
``__version__``, the images in ``manifests/samples/``, and every ``ghcr.io/gptd-io`` image or chart reference,
release tag and chart version in README.md and docs/. The release workflow refuses a ``v*`` tag that is not
``v`` + this number, and runs ``--check``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
CHART = ROOT / "helm" / "gptd-operator" / "Chart.yaml"
VALUES = ROOT / "helm" / "gptd-operator" / "values.yaml"
SEMVER = r"\d+\.\d+\.\d+"

# (file, pattern): group "v" of each match must be the version. Patterns name exactly the release's artefacts.
_IMAGE = rf"ghcr\.io/gptd-io/gptd-(?:operator|runtime):(?P<v>{SEMVER})(?:-cpu)?\b"
_DOCS = [
    _IMAGE,
    rf"oci://ghcr\.io/gptd-io/charts/gptd-operator(?::|` version `| --version )(?P<v>{SEMVER})\b",
    rf"targetRevision: v?(?P<v>{SEMVER})\b",
    rf"^\s*tag: (?P<v>{SEMVER})\s*$",
    rf"release `(?P<v>{SEMVER})`",
    rf"pyproject\.toml`'s, `(?P<v>{SEMVER})`",
]
FOLLOWERS: list[tuple[Path, list[str]]] = [
    (PYPROJECT, [rf'^version = "(?P<v>{SEMVER})"$']),
    (CHART, [rf"^version: (?P<v>{SEMVER})$", rf'^appVersion: "(?P<v>{SEMVER})"$']),
    (VALUES, [_IMAGE]),
    (ROOT / "operator" / "gptd_operator" / "settings.py", [_IMAGE]),
    (ROOT / "runtime" / "gptd_runtime" / "__init__.py", [rf'^__version__ = "(?P<v>{SEMVER})"$']),
    (ROOT / "manifests" / "samples" / "cpu.yaml", [_IMAGE]),
    (ROOT / "manifests" / "samples" / "demo-model.yaml", [_IMAGE]),
    (ROOT / "README.md", _DOCS),
    (ROOT / "docs" / "delivery.md", _DOCS),
    (ROOT / "docs" / "operator.md", _DOCS),
    (ROOT / "docs" / "runtime.md", _DOCS),
]


def version(pyproject: Path = PYPROJECT) -> str:
    return tomllib.loads(pyproject.read_text())["project"]["version"]


def mismatches(want: str, root: Path = ROOT) -> list[str]:
    """Every follower that names another version, as 'file:line: found X'; also required ones that are missing."""
    out = []
    for path, patterns in FOLLOWERS:
        path = root / path.relative_to(ROOT)
        if not path.exists():
            out.append(f"{path.relative_to(root)}: missing")
            continue
        text = path.read_text()
        for pattern in patterns:
            found = list(re.finditer(pattern, text, flags=re.M))
            if not found and path in (root / PYPROJECT.relative_to(ROOT), root / CHART.relative_to(ROOT)):
                out.append(f"{path.relative_to(root)}: no match for {pattern}")
            for m in found:
                if m.group("v") != want:
                    line = text.count("\n", 0, m.start()) + 1
                    out.append(f"{path.relative_to(root)}:{line}: {m.group(0).strip()!r} is not {want}")
    chart = yaml.safe_load((root / CHART.relative_to(ROOT)).read_text())
    image_tag = yaml.safe_load((root / VALUES.relative_to(ROOT)).read_text())["image"]["tag"]
    if image_tag:
        out.append(f"values.yaml: image.tag {image_tag!r} must be empty (the operator image follows appVersion)")
    if str(chart.get("appVersion")) != want or str(chart.get("version")) != want:
        out.append(f"Chart.yaml: version {chart.get('version')} / appVersion {chart.get('appVersion')} are not {want}")
    return sorted(set(out))


def set_version(new: str, root: Path = ROOT) -> list[Path]:
    if not re.fullmatch(SEMVER, new):
        raise SystemExit(f"version must look like 1.2.3, got {new!r}")
    changed = []
    for path, patterns in FOLLOWERS:
        path = root / path.relative_to(ROOT)
        text = path.read_text()
        updated = text
        for pattern in patterns:
            updated = re.sub(pattern, lambda m: m.group(0).replace(m.group("v"), new, 1)
                             if m.group(0).count(m.group("v")) == 1 else m.group(0), updated, flags=re.M)
        if updated != text:
            path.write_text(updated)
            changed.append(path)
    return changed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="fail when a follower disagrees")
    group.add_argument("--set", metavar="X.Y.Z", help="rewrite pyproject.toml and every follower")
    args = parser.parse_args(argv)
    if args.set:
        for path in set_version(args.set):
            print(f"wrote {path.relative_to(ROOT)}")
        print("now run `make generate` (manifests/install.yaml carries the chart's version)")
        return 0
    want = version()
    if args.check:
        bad = mismatches(want)
        if bad:
            print(f"version {want} (pyproject.toml) disagrees with:\n  " + "\n  ".join(bad), file=sys.stderr)
            return 1
    print(want)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
