"""deploy/kubernetes read the way the tests need it: the kustomization's resources, the pod templates of
its workloads, each container's command line with Kubernetes' `$(VAR)` references expanded, and afsd's
own argument parser to check those command lines.

Shared by the manifest checks (tests/test_kubernetes_manifests.py) and the pod smoke run
(tests/support/pods.py), so both read the manifests the same way.
"""

from __future__ import annotations

import argparse
import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "deploy" / "kubernetes"
# The Kubernetes versions docs/kubernetes.md claims: native sidecars (init containers with
# restartPolicy: Always) are on by default from 1.29.
OLDEST_KUBERNETES, NEWEST_KUBERNETES = "1.29.0", "1.37.0"
WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet")
_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def kustomization(root: Path) -> dict[str, Any]:
    return yaml.safe_load((root / "kustomization.yaml").read_text())


def manifest_files(root: Path = MANIFESTS) -> list[Path]:
    """The resource files a kustomization (or component) lists itself (not those of the bases it names)."""
    return [root / name for name in kustomization(root).get("resources", []) if (root / name).is_file()]


def load_objects(root: Path = MANIFESTS) -> list[dict[str, Any]]:
    """Every object kustomize would build from `root`, in order: its resources (files, and directories
    with a kustomization of their own), then its components' resources and patches. Transformers that
    only label, name the namespace or set the image are not applied (the objects say the namespace)."""
    objects: list[dict[str, Any]] = []
    for name in kustomization(root).get("resources", []):
        path = (root / name).resolve()
        objects += load_objects(path) if path.is_dir() else \
            [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return with_components(objects, [(root / name).resolve() for name in kustomization(root).get("components", [])])


def with_components(objects: list[dict[str, Any]], components: list[Path]) -> list[dict[str, Any]]:
    """`objects` with kustomize components applied: their resources added, their JSON 6902 patches made."""
    objects = copy.deepcopy(objects)
    for root in components:
        component = kustomization(root)
        if component.get("kind") != "Component":
            raise ValueError(f"{root}: not a kustomize Component")
        objects += load_objects(root) if component.get("resources") else []
        for patch in component.get("patches", []):
            target = patch["target"]
            matched = [o for o in objects if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
            if not matched:
                raise ValueError(f"{root}: a patch for {target['kind']}/{target['name']}, which is not there")
            for document in matched:
                for operation in yaml.safe_load(patch["patch"]):
                    apply_json_patch(document, operation)
    return objects


def apply_json_patch(document: dict[str, Any], operation: dict[str, Any]) -> None:
    """One RFC 6902 `add` or `replace` (what the components use; anything else is refused)."""
    if operation["op"] not in ("add", "replace"):
        raise ValueError(f"JSON patch op {operation['op']!r}: only add and replace are supported here")
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")[1:]]
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    value = copy.deepcopy(operation["value"])
    if isinstance(node, list):
        if last == "-":
            node.append(value)
        elif operation["op"] == "add":
            node.insert(int(last), value)
        else:
            node[int(last)] = value
    elif operation["op"] == "replace" and last not in node:
        raise ValueError(f"JSON patch replace of {operation['path']}, which is not there")
    else:
        node[last] = value


@dataclass(frozen=True)
class Container:
    """One container of a workload's pod template (init containers included)."""

    workload: str
    spec: dict[str, Any]
    sidecar: bool
    init: bool = False           # an init container (a sidecar too when `sidecar`)

    @property
    def name(self) -> str:
        return self.spec["name"]

    def env_values(self, field_values: dict[str, str]) -> dict[str, str]:
        """The container's environment as the kubelet computes it: `value`s, with `fieldRef`s taken
        from `field_values` (by field path, e.g. `status.podIP`)."""
        env: dict[str, str] = {}
        for item in self.spec.get("env", []):
            if "value" in item:
                env[item["name"]] = expand(item["value"], env)
            else:
                env[item["name"]] = field_values[item["valueFrom"]["fieldRef"]["fieldPath"]]
        return env

    def argv(self, field_values: dict[str, str]) -> list[str]:
        """`command` + `args` after the image's entrypoint (`afsd`), with `$(VAR)` expanded."""
        env = self.env_values(field_values)
        return [expand(arg, env) for arg in [*self.spec.get("command", []), *self.spec.get("args", [])]]

    def port(self, name_or_number: str | int) -> int:
        if isinstance(name_or_number, int):
            return name_or_number
        for port in self.spec.get("ports", []):
            if port.get("name") == name_or_number:
                return port["containerPort"]
        raise KeyError(f"{self.workload}/{self.name} has no port named {name_or_number!r}")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion (an unknown reference stays as it is, as the kubelet leaves it)."""
    return _REFERENCE.sub(lambda m: env.get(m.group(1), m.group(0)), text)


@dataclass(frozen=True)
class Workload:
    kind: str
    name: str
    pod: dict[str, Any]          # the pod template's spec
    labels: dict[str, str]       # the pod template's labels
    replicas: int

    @property
    def containers(self) -> list[Container]:
        init = [Container(self.name, c, c.get("restartPolicy") == "Always", init=True)
                for c in self.pod.get("initContainers", [])]
        return [*init, *(Container(self.name, c, False) for c in self.pod["containers"])]

    def volume(self, name: str) -> dict[str, Any]:
        for volume in self.pod.get("volumes", []):
            if volume["name"] == name:
                return volume
        raise KeyError(f"{self.name} has no volume {name!r}")


def workloads(objects: list[dict[str, Any]]) -> list[Workload]:
    return [Workload(o["kind"], o["metadata"]["name"], o["spec"]["template"]["spec"],
                     o["spec"]["template"]["metadata"].get("labels", {}), o["spec"].get("replicas", 1))
            for o in objects if o["kind"] in WORKLOAD_KINDS]


class FlagError(Exception):
    """A command line afsd's parser refuses (the message is argparse's)."""


def strict_parser() -> argparse.ArgumentParser:
    """afsd's own parser, with abbreviations refused (`--liste` must not pass for `--listen`) and
    errors raised instead of exiting."""
    from afsd.cli import build_parser

    def refuse(message: str) -> None:
        raise FlagError(message)

    def walk(parser: argparse.ArgumentParser) -> None:
        parser.allow_abbrev = False
        parser.error = refuse  # type: ignore[method-assign]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    walk(child)

    parser = build_parser()
    walk(parser)
    return parser


def parse_command_line(argv: list[str]) -> argparse.Namespace:
    """`afsd ARGV` parsed exactly as the image's entrypoint would (FlagError if afsd refuses it)."""
    return strict_parser().parse_args(argv)
