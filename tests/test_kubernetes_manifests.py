"""deploy/kubernetes: every object validates against the Kubernetes API schemas (the oldest and newest
versions docs/kubernetes.md claims, strictly: an unknown field fails), and every container's command
line is afsd's real one — parsed by afsd's own argument parser, its ports the ones the pod declares and
probes, the names it dials Services that lead to a daemon listening on that port."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support.manifests import (
    MANIFESTS,
    NEWEST_KUBERNETES,
    OLDEST_KUBERNETES,
    Container,
    FlagError,
    Workload,
    load_objects,
    manifest_files,
    parse_command_line,
    workloads,
)

# Stand-ins for the downward API: what the kubelet would put in each fieldRef.
FIELDS = {"status.podIP": "10.244.1.7", "spec.nodeName": "worker-1", "metadata.name": "afsd-proxy-abc12"}
LISTEN_FLAGS = ("listen", "http_listen", "metrics_listen", "advertise")
DIAL_FLAGS = ("discovery_endpoint", "discovery_addr", "afslet_target", "discovery_target", "proxy_peers_target")


def _port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def _values(args: Any, dest: str) -> list[str]:
    value = getattr(args, dest, None)
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, list) else [value]


def _services(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}


def _selected(service: dict[str, Any], all_workloads: list[Workload]) -> list[Workload]:
    selector = service["spec"].get("selector", {})
    return [w for w in all_workloads if selector and all(w.labels.get(k) == v for k, v in selector.items())]


def _listening_ports(container: Container) -> set[int]:
    args = parse_command_line(container.argv(FIELDS))
    return {_port_of(v) for dest in LISTEN_FLAGS for v in _values(args, dest)}


def manifest_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Every way a container's command line disagrees with afsd or with the manifests (empty: none)."""
    problems: list[str] = []
    all_workloads = workloads(objects)
    services = _services(objects)
    for workload in all_workloads:
        for container in workload.containers:
            where = f"{workload.name}/{container.name}"
            if container.spec.get("command"):
                problems.append(f"{where}: sets `command`; the image's entrypoint is afsd, give `args`")
            try:
                args = parse_command_line(container.argv(FIELDS))
            except FlagError as error:
                problems.append(f"{where}: afsd refuses its command line: {error}")
                continue
            listening = {_port_of(v) for dest in LISTEN_FLAGS if dest != "advertise" for v in _values(args, dest)}
            declared = {p["containerPort"] for p in container.spec.get("ports", [])}
            if listening != declared:
                problems.append(f"{where}: listens on ports {sorted(listening)} but declares {sorted(declared)}")
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.spec.get(probe_name)
                if probe is None:
                    continue
                try:
                    port = container.port(probe["httpGet"]["port"])
                except KeyError as error:
                    problems.append(f"{where}: {probe_name}: {error.args[0]}")
                    continue
                http = {_port_of(v) for dest in ("metrics_listen", "http_listen") for v in _values(args, dest)}
                if port not in http:
                    problems.append(f"{where}: {probe_name} probes port {port}, which serves no /healthz")
            for dest in DIAL_FLAGS:
                for target in _values(args, dest):
                    problems += _dial_problems(where, dest, target, services, all_workloads)
    for service in services.values():
        selected = _selected(service, all_workloads)
        if not selected:
            problems.append(f"service {service['metadata']['name']}: its selector matches no workload")
        for port in service["spec"]["ports"]:
            for workload in selected:
                if not any(_resolves(c, port.get("targetPort", port["port"])) for c in workload.containers):
                    problems.append(f"service {service['metadata']['name']}: targetPort {port.get('targetPort')} "
                                    f"is no port of {workload.name}")
    return problems


def _resolves(container: Container, target: str | int) -> bool:
    try:
        return container.port(target) in _listening_ports(container)
    except (KeyError, FlagError):
        return False


def _dial_problems(where: str, dest: str, target: str, services: dict[str, dict[str, Any]],
                   all_workloads: list[Workload]) -> list[str]:
    host, _, port_text = target.rpartition(":")
    flag = "--" + dest.replace("_", "-")
    service = services.get(host.split(".")[0])
    if service is None:
        return [f"{where}: {flag} {target}: no Service named {host}"]
    port = next((p for p in service["spec"]["ports"] if p["port"] == int(port_text)), None)
    if port is None:
        return [f"{where}: {flag} {target}: Service {host} has no port {port_text}"]
    if not any(_resolves(c, port.get("targetPort", port["port"])) for w in _selected(service, all_workloads)
               for c in w.containers):
        return [f"{where}: {flag} {target}: nothing behind Service {host} listens on its target port"]
    return []


def test_the_kustomization_lists_every_manifest() -> None:
    listed = {p.name for p in manifest_files()}
    on_disk = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, NEWEST_KUBERNETES])
def test_every_manifest_validates_against_the_kubernetes_api(version: str) -> None:
    for path in manifest_files():
        for document in yaml.safe_load_all(path.read_text()):
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{path.name}: {document['kind']}/{document['metadata']['name']} is invalid for "
                            f"Kubernetes {version}: {error}")


def test_the_node_pods_sidecars_need_kubernetes_1_29() -> None:
    """The version floor is real: strict validation for 1.27 refuses a sidecar's restartPolicy."""
    daemonset = next(o for o in load_objects() if o["kind"] == "DaemonSet")
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(daemonset, "1.27.0", strict=True)


def test_every_containers_command_line_ports_and_targets_are_afsds_real_ones() -> None:
    assert manifest_problems(load_objects()) == []


def _mutated(edit) -> list[dict[str, Any]]:
    objects = copy.deepcopy(load_objects())
    edit(objects)
    return objects


def _container(objects: list[dict[str, Any]], workload: str, name: str) -> dict[str, Any]:
    pod = next(o for o in objects if o["metadata"]["name"] == workload)["spec"]["template"]["spec"]
    return next(c for c in [*pod.get("initContainers", []), *pod["containers"]] if c["name"] == name)


def _replace_arg(objects, workload: str, name: str, old: str, new: str) -> None:
    container = _container(objects, workload, name)
    container["args"] = [arg.replace(old, new) for arg in container["args"]]


@pytest.mark.parametrize("edit, expected", [
    (lambda o: _replace_arg(o, "afsd-node", "afslet", "--node-socket=", "--node-sockt="),
     "afsd-node/afslet: afsd refuses its command line: unrecognized arguments: --node-sockt=/run/afsd/node.sock"),
    (lambda o: _replace_arg(o, "afsd-node", "afslet", "--limit-cpu=", "--limit-cp="),
     "unrecognized arguments: --limit-cp=4"),
    (lambda o: _replace_arg(o, "afsd-discovery", "discovery", ":9100", ":9109"),
     "afsd-discovery/discovery: listens on ports [9109, 60051] but declares [9100, 60051]"),
    (lambda o: _replace_arg(o, "afsd-proxy", "proxy", "afsd-afslet:61051", "afsd-afslet:61052"),
     "--afslet-target afsd-afslet:61052: Service afsd-afslet has no port 61052"),
    (lambda o: _replace_arg(o, "afsd-node", "node", "=afsd-discovery:", "=afsd-disco:"),
     "--discovery-endpoint afsd-disco:60051: no Service named afsd-disco"),
    (lambda o: _container(o, "afsd-node", "node")["livenessProbe"]["httpGet"].update(port="ls-metrics"),
     "afsd-node/node: livenessProbe: afsd-node/node has no port named 'ls-metrics'"),
])
def test_a_misspelled_flag_or_a_wrong_port_is_caught(edit, expected: str) -> None:
    problems = manifest_problems(_mutated(edit))
    assert any(expected in problem for problem in problems), problems


def _mount(container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mount `path` lies under (the longest mount path that is a prefix of it)."""
    mounts = [m for m in container.get("volumeMounts", []) if Path(path).is_relative_to(m["mountPath"])]
    assert mounts, f"{container['name']}: nothing is mounted where {path} is"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def test_the_node_pods_daemons_share_their_sockets_state_and_mounts() -> None:
    (node_pod,) = [w for w in workloads(load_objects()) if w.kind == "DaemonSet"]
    by_name = {c.name: c for c in node_pod.containers}
    args = {name: parse_command_line(c.argv(FIELDS)) for name, c in by_name.items()}
    layerstore, node, afslet = args["layerstore"], args["node"], args["afslet"]
    assert afslet.node_socket == node.socket
    assert node.layerstore_admin_socket == layerstore.admin_socket
    assert node.layerstore == layerstore.listen
    for a, b, path in (("afslet", "node", afslet.node_socket), ("node", "layerstore", layerstore.admin_socket)):
        assert _mount(by_name[a].spec, str(path))["name"] == _mount(by_name[b].spec, str(path))["name"]
    # The node daemon mounts images where afslet asks (its work dir) and keeps blobs the layerstore imports:
    # same volume at the same path, the node daemon's mounts propagating to the host and back into afslet.
    work = _mount(by_name["afslet"].spec, str(afslet.work_dir))
    assert _mount(by_name["node"].spec, str(afslet.work_dir)) == {**work, "mountPropagation": "Bidirectional"}
    assert work["mountPropagation"] == "HostToContainer"
    assert _mount(by_name["layerstore"].spec, str(node.state_dir))["name"] == work["name"]
    assert node_pod.volume(work["name"])["hostPath"]["path"] == "/var/lib/afsd"
    # Start order: layerstore, node daemon (sidecars), then afslet; they stop in the reverse order.
    assert [(c.name, c.sidecar) for c in node_pod.containers] == [("layerstore", True), ("node", True),
                                                                  ("afslet", False)]
    for name in ("layerstore", "node", "afslet"):
        assert args[name].node_id == FIELDS["spec.nodeName"]
