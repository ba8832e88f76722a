"""deploy/kubernetes: every object of every variant (the base, the cert-manager overlay, the bearer-token
component) validates — Kubernetes objects against the API schemas of the oldest and newest versions
docs/kubernetes.md claims, cert-manager's against tests/support/certmanager.py's schema, strictly: an
unknown field fails — and every container's command line is afsd's real one: parsed by afsd's own
argument parser, its ports the ones the pod declares and probes, the names it dials Services that lead
to a daemon listening on that port, every daemon on mutual TLS with a certificate that names what its
peers dial (the Service's name, or the pod's IP) and, for a node, its node id."""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from afsd.trust.identity import NODE_ROLE
from afsd.trust.tokens import token_file_mode_is_private
from tests.support import certmanager
from tests.support.manifests import (
    MANIFESTS,
    NEWEST_KUBERNETES,
    OLDEST_KUBERNETES,
    Container,
    FlagError,
    Workload,
    kustomization,
    load_objects,
    manifest_files,
    parse_command_line,
    with_components,
    workloads,
)

# Stand-ins for the downward API: what the kubelet would put in each fieldRef.
FIELDS = {"status.podIP": "10.244.1.7", "spec.nodeName": "worker-1", "metadata.name": "afsd-proxy-abc12"}
LISTEN_FLAGS = ("listen", "http_listen", "metrics_listen", "advertise", "data_listen")
DIAL_FLAGS = ("discovery_endpoint", "discovery_addr", "afslet_target", "discovery_target", "proxy_peers_target")
# How a dialler checks the certificate of what it reaches (afsd/rpc.py): by the name it resolved (every
# replica behind a Service shows the Service's certificate), by the address it dialled (each afslet its
# own), or not at all (plain HTTP between proxies, for /status counts).
VERIFIED_BY_NAME = ("discovery_endpoint", "discovery_addr", "discovery_target")
VERIFIED_BY_ADDRESS = ("afslet_target",)
DAEMONS = ("discovery", "layerstore", "node", "let", "proxy")
TLS_FILES = ("ca.crt", "tls.crt", "tls.key")
CA_FILES = {"tls.crt": "ca.crt", "tls.key": "ca.key"}   # cert-manager's CA Secret, as `afsd certs issue --dir` reads it


@functools.cache
def variants() -> dict[str, list[dict[str, Any]]]:
    """Every way the manifests are meant to be applied: each kustomization root, and the components on
    top (cached: copy before changing)."""
    with_cert_manager = load_objects(MANIFESTS / "overlays" / "cert-manager")
    return {
        "base": load_objects(),
        "overlays/cert-manager": with_cert_manager,
        "overlays/cert-manager + components/proxy-tokens": with_components(
            with_cert_manager, [MANIFESTS / "components" / "proxy-tokens"]),
    }


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


@dataclass(frozen=True)
class Certificate:
    """What a container's --tls-dir holds, as far as the manifests say: the name, roles and hosts of the
    certificate there, and where it comes from."""

    name: str
    roles: frozenset[str]
    hosts: frozenset[str]
    origin: str


def _certificates_by_secret(objects: list[dict[str, Any]]) -> dict[str, Certificate]:
    found = {}
    for o in objects:
        if certmanager.is_cert_manager(o) and o["kind"] == "Certificate":
            spec = o["spec"]
            found[spec["secretName"]] = Certificate(
                spec.get("commonName", ""), frozenset(spec.get("subject", {}).get("organizations", [])),
                frozenset([*spec.get("dnsNames", []), *spec.get("ipAddresses", [])]),
                f"Secret {spec['secretName']} (Certificate {o['metadata']['name']})")
    return found


def _volume_of(container: Container, path: Path | str) -> dict[str, Any] | None:
    """The volume mount `path` lies under (the longest mount path that is a prefix of it), if any."""
    mounts = [m for m in container.spec.get("volumeMounts", []) if Path(path).is_relative_to(m["mountPath"])]
    return max(mounts, key=lambda m: len(m["mountPath"])) if mounts else None


def tls_problems(workload: Workload, container: Container, args: Any,
                 by_secret: dict[str, Certificate]) -> tuple[list[str], Certificate | None]:
    """Whether a daemon runs on mutual TLS from the layout cert-manager writes, and its certificate (None
    when the manifests do not say what it is: a Secret brought by the operator)."""
    where = f"{workload.name}/{container.name}"
    if args.tls_dir is None:
        return [f"{where}: runs without TLS (no --tls-dir)"], None
    mount = _volume_of(container, args.tls_dir)
    if mount is None or Path(mount["mountPath"]) != args.tls_dir:
        return [f"{where}: --tls-dir {args.tls_dir} is not a volume mount"], None
    volume = workload.volume(mount["name"])
    if "secret" in volume:
        items = volume["secret"].get("items")
        if items is not None and {(i["key"], i["path"]) for i in items} != {(f, f) for f in TLS_FILES}:
            return [f"{where}: --tls-dir {args.tls_dir}: Secret {volume['secret']['secretName']} is not in "
                    f"cert-manager's layout ({', '.join(TLS_FILES)})"], None
        return [], by_secret.get(volume["secret"]["secretName"])
    issuers = [c for c in workload.containers if c.spec.get("args", [])[:2] == ["certs", "issue"]]
    for issuer in issuers:
        issued = parse_command_line(issuer.argv(FIELDS))
        out = _volume_of(issuer, issued.out) if issued.out else None
        if out is None or out["name"] != mount["name"] or Path(out["mountPath"]) != issued.out:
            continue
        problems = []
        if issuer.sidecar or workload.containers.index(issuer) > workload.containers.index(container):
            problems.append(f"{where}: its certificate is issued by {issuer.name}, which does not run before it")
        ca = _volume_of(issuer, issued.dir)
        ca_volume = workload.volume(ca["name"]) if ca else {}
        items = {(i["key"], i["path"]) for i in ca_volume.get("secret", {}).get("items", [])}
        if not ca or Path(ca["mountPath"]) != issued.dir or items != set(CA_FILES.items()):
            problems.append(f"{where}: {issuer.name} issues with --dir {issued.dir}, which is not a CA Secret "
                            f"mapped as {', '.join(f'{k} -> {v}' for k, v in CA_FILES.items())}")
        roles = frozenset({"afsd:users"} if issued.user else {NODE_ROLE})
        return problems, Certificate(issued.name, roles, frozenset(issued.host), f"issued by {issuer.name}")
    return [f"{where}: --tls-dir {args.tls_dir} is on volume {mount['name']}, neither a Secret nor written by "
            "an init container's `certs issue --out`"], None


def node_identity_problems(where: str, args: Any, certificate: Certificate) -> list[str]:
    """What the daemon itself and its peers check (afsd/cli/layerstore.py, discovery's heartbeat rule)."""
    problems = []
    if NODE_ROLE not in certificate.roles:
        problems.append(f"{where}: the certificate of its --tls-dir ({certificate.origin}) is not a node's")
    if args.command in ("layerstore", "let", "node") and certificate.name != args.node_id:
        problems.append(f"{where}: its certificate ({certificate.origin}) names {certificate.name!r}, "
                        f"not its --node-id {args.node_id!r}")
    if args.command in ("layerstore", "let"):
        host = (args.advertise or args.listen).rpartition(":")[0]
        if host not in certificate.hosts:
            problems.append(f"{where}: its certificate ({certificate.origin}) does not cover {host}, where its "
                            "peers dial it")
    return problems


def token_problems(workload: Workload, container: Container, args: Any) -> list[str]:
    """A --user-token-file must come from a Secret whose files the daemon can read and afsd accepts."""
    path = getattr(args, "user_token_file", None)
    if path is None:
        return []
    where = f"{workload.name}/{container.name}"
    mount = _volume_of(container, path)
    secret = workload.volume(mount["name"]).get("secret") if mount else None
    if secret is None:
        return [f"{where}: --user-token-file {path} is not in a Secret volume"]
    mode = next((i.get("mode") for i in secret.get("items", []) if Path(mount["mountPath"]) / i["path"] == path),
                None) or secret.get("defaultMode", 0o644)
    security = {**workload.pod.get("securityContext", {}), **container.spec.get("securityContext", {})}
    if security.get("runAsUser", 0) != 0:
        if "fsGroup" not in security:
            return [f"{where}: --user-token-file {path}: a Secret's files are root's; without fsGroup "
                    f"user {security['runAsUser']} cannot read them"]
        mode |= 0o440   # the kubelet gives the pod's fsGroup read access to a Secret volume's files
    if not token_file_mode_is_private(mode):
        return [f"{where}: --user-token-file {path} would have mode {mode:o}, which afsd refuses"]
    return []


def manifest_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Every way a container's command line disagrees with afsd or with the manifests (empty: none)."""
    problems: list[str] = []
    all_workloads = workloads(objects)
    services = _services(objects)
    by_secret = _certificates_by_secret(objects)
    certificates: dict[tuple[str, str], Certificate] = {}
    for workload in all_workloads:
        for container in workload.containers:
            if container.spec.get("command"):
                continue
            try:
                args = parse_command_line(container.argv(FIELDS))
            except FlagError:
                continue   # reported below
            if args.command in DAEMONS:
                found, certificate = tls_problems(workload, container, args, by_secret)
                problems += found + token_problems(workload, container, args)
                if certificate is not None:
                    certificates[workload.name, container.name] = certificate
                    problems += node_identity_problems(f"{workload.name}/{container.name}", args, certificate)
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
                    problems += _dial_problems(where, dest, target, services, all_workloads, certificates)
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
                   all_workloads: list[Workload], certificates: dict[tuple[str, str], Certificate]) -> list[str]:
    host, _, port_text = target.rpartition(":")
    flag = "--" + dest.replace("_", "-")
    service = services.get(host.split(".")[0])
    if service is None:
        return [f"{where}: {flag} {target}: no Service named {host}"]
    port = next((p for p in service["spec"]["ports"] if p["port"] == int(port_text)), None)
    if port is None:
        return [f"{where}: {flag} {target}: Service {host} has no port {port_text}"]
    behind = [(w, c) for w in _selected(service, all_workloads) for c in w.containers
              if _resolves(c, port.get("targetPort", port["port"]))]
    if not behind:
        return [f"{where}: {flag} {target}: nothing behind Service {host} listens on its target port"]
    problems = []
    for workload, container in behind:
        certificate = certificates.get((workload.name, container.name))
        expected = host if dest in VERIFIED_BY_NAME else FIELDS["status.podIP"] if dest in VERIFIED_BY_ADDRESS else None
        if certificate is not None and expected is not None and expected not in certificate.hosts:
            problems.append(f"{where}: {flag} {target}: the certificate of {workload.name}/{container.name} "
                            f"({certificate.origin}) does not name {expected}")
    return problems


def test_every_kustomization_lists_every_manifest_and_every_one_is_a_tested_variant() -> None:
    roots = sorted(p.parent for p in MANIFESTS.rglob("kustomization.yaml"))
    for root in roots:
        listed = {p.name for p in manifest_files(root)}
        on_disk = {p.name for p in root.glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == on_disk, root
    # Every overlay and component is one of the variants the tests below validate and check.
    named = {"." if name == "base" else part for name in variants() for part in name.split(" + ")}
    named |= {str((root / c).resolve().relative_to(MANIFESTS)) for root in roots
              for c in kustomization(root).get("components", [])}
    assert {str(root.relative_to(MANIFESTS)) for root in roots} == named


def _validate(document: dict[str, Any], version: str) -> None:
    if certmanager.is_cert_manager(document):
        certmanager.validate(document)   # not in kubernetes-validate's schemas (a custom resource)
    else:
        kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, NEWEST_KUBERNETES])
@pytest.mark.parametrize("variant", list(variants()))
def test_every_object_validates_against_the_kubernetes_api_or_cert_managers(variant: str, version: str) -> None:
    for document in variants()[variant]:
        try:
            _validate(document, version)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as error:
            pytest.fail(f"{variant}: {document['kind']}/{document['metadata']['name']} is invalid for "
                        f"Kubernetes {version}: {getattr(error, 'message', error)}")


@pytest.mark.parametrize("edit, expected", [
    (lambda spec: spec.update(dnsName=spec.pop("dnsNames")), "Additional properties are not allowed ('dnsName'"),
    (lambda spec: spec.update(usages=["server auth", "client-auth"]), "'client-auth' is not one of"),
    (lambda spec: spec.pop("issuerRef"), "'issuerRef' is a required property"),
    (lambda spec: spec.update(duration="1y"), "'1y' does not match"),
])
def test_a_misspelled_cert_manager_field_fails_validation(edit, expected: str) -> None:
    certificate = copy.deepcopy(next(o for o in variants()["overlays/cert-manager"]
                                     if o["kind"] == "Certificate" and o["metadata"]["name"] == "afsd-discovery"))
    edit(certificate["spec"])
    with pytest.raises(jsonschema.ValidationError, match=re.escape(expected)):
        certmanager.validate(certificate)


def test_the_node_pods_sidecars_need_kubernetes_1_29() -> None:
    """The version floor is real: strict validation for 1.27 refuses a sidecar's restartPolicy."""
    daemonset = next(o for o in load_objects() if o["kind"] == "DaemonSet")
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(daemonset, "1.27.0", strict=True)


@pytest.mark.parametrize("variant", list(variants()))
def test_every_containers_command_line_ports_targets_and_certificates_are_afsds_real_ones(variant: str) -> None:
    assert manifest_problems(variants()[variant]) == []


def _mutated(edit) -> list[dict[str, Any]]:
    objects = copy.deepcopy(variants()["overlays/cert-manager + components/proxy-tokens"])
    edit(objects)
    return objects


def _certificate(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == "Certificate" and o["metadata"]["name"] == name)["spec"]


def _volume(objects: list[dict[str, Any]], workload: str, name: str) -> dict[str, Any]:
    pod = next(o for o in objects if o["metadata"]["name"] == workload)["spec"]["template"]["spec"]
    return next(v for v in pod["volumes"] if v["name"] == name)


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
    # TLS
    (lambda o: _replace_arg(o, "afsd-proxy", "proxy", "--tls-dir=", "--tls-dri="),
     "afsd-proxy/proxy: afsd refuses its command line: unrecognized arguments: --tls-dri=/etc/afsd/tls"),
    (lambda o: _container(o, "afsd-discovery", "discovery")["args"].remove("--tls-dir=/etc/afsd/tls"),
     "afsd-discovery/discovery: runs without TLS (no --tls-dir)"),
    (lambda o: _replace_arg(o, "afsd-node", "afslet", "--tls-dir=/etc/afsd/tls", "--tls-dir=/etc/afsd"),
     "afsd-node/afslet: --tls-dir /etc/afsd is not a volume mount"),
    (lambda o: _replace_arg(o, "afsd-node", "node-certificate", "--host=$(POD_IP)", "--host=127.0.0.1"),
     "afsd-node/layerstore: its certificate (issued by node-certificate) does not cover 10.244.1.7"),
    (lambda o: _replace_arg(o, "afsd-node", "node-certificate", "$(NODE_NAME)", "$(POD_IP)"),
     "afsd-node/layerstore: its certificate (issued by node-certificate) names '10.244.1.7', not its --node-id "
     "'worker-1'"),
    (lambda o: _replace_arg(o, "afsd-node", "node-certificate", "--host=$(POD_IP)", "--host=afsd-afslet"),
     "afsd-proxy/proxy: --afslet-target afsd-afslet:61051: the certificate of afsd-node/afslet (issued by "
     "node-certificate) does not name 10.244.1.7"),
    (lambda o: _volume(o, "afsd-node", "cluster-ca")["secret"]["items"][1].update(path="tls.key"),
     "afsd-node/node: node-certificate issues with --dir /etc/afsd/ca, which is not a CA Secret mapped as "
     "tls.crt -> ca.crt, tls.key -> ca.key"),
    (lambda o: _certificate(o, "afsd-discovery")["dnsNames"].remove("afsd-discovery"),
     "afsd-node/layerstore: --discovery-endpoint afsd-discovery:60051: the certificate of "
     "afsd-discovery/discovery (Secret afsd-discovery-tls (Certificate afsd-discovery)) does not name "
     "afsd-discovery"),
    (lambda o: _certificate(o, "afsd-proxy")["subject"].update(organizations=["afsd:users"]),
     "afsd-proxy/proxy: the certificate of its --tls-dir (Secret afsd-proxy-tls (Certificate afsd-proxy)) is "
     "not a node's"),
    (lambda o: _volume(o, "afsd-proxy", "tls")["secret"].update(items=[{"key": "tls.crt", "path": "cert.pem"}]),
     "afsd-proxy/proxy: --tls-dir /etc/afsd/tls: Secret afsd-proxy-tls is not in cert-manager's layout"),
    (lambda o: _replace_arg(o, "afsd-proxy", "proxy", "--user-token-file=", "--user-token-fil="),
     "unrecognized arguments: --user-token-fil=/etc/afsd/tokens/tokens"),
    (lambda o: _volume(o, "afsd-proxy", "user-tokens")["secret"].update(defaultMode=0o444),
     "afsd-proxy/proxy: --user-token-file /etc/afsd/tokens/tokens would have mode 444, which afsd refuses"),
    # the snapshotter
    (lambda o: _replace_arg(o, "afsd-node", "snapshotter", "--node-socket=", "--node-sockt="),
     "afsd-node/snapshotter: afsd refuses its command line: unrecognized arguments: --node-sockt=/run/afsd/node.sock"),
    (lambda o: _replace_arg(o, "afsd-node", "snapshotter", ":9104", ":9105"),
     "afsd-node/snapshotter: listens on ports [9105] but declares [9104]"),
])
def test_a_misspelled_flag_or_a_wrong_port_is_caught(edit, expected: str) -> None:
    problems = manifest_problems(_mutated(edit))
    assert any(expected in problem for problem in problems), problems


def _mount(container: dict[str, Any], path: str) -> dict[str, Any]:
    mount = _volume_of(Container("", container, False), path)
    assert mount, f"{container['name']}: nothing is mounted where {path} is"
    return mount


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
    # Start order: the node certificate, layerstore, node daemon, snapshotter (sidecars), then afslet; they
    # stop in the reverse order.
    assert [(c.name, c.sidecar) for c in node_pod.containers] == [
        ("node-certificate", False), ("layerstore", True), ("node", True), ("snapshotter", True), ("afslet", False)]
    for name in ("layerstore", "node", "afslet"):
        assert args[name].node_id == FIELDS["spec.nodeName"] == args["node-certificate"].name
    # The snapshotter (docs/containerd.md): it calls the node daemon's socket; containerd on the host dials
    # its socket and mounts overlays over its snapshot directories, so both are the host's, at the host's
    # paths; its lazy layers point at the node daemon's mounts, which propagate to it.
    snapshotter = args["snapshotter"]
    assert snapshotter.node_socket == node.socket
    assert _mount(by_name["snapshotter"].spec, str(snapshotter.node_socket))["name"] == \
        _mount(by_name["node"].spec, str(node.socket))["name"]
    socket_mount = _mount(by_name["snapshotter"].spec, str(snapshotter.address))
    assert node_pod.volume(socket_mount["name"])["hostPath"]["path"] == socket_mount["mountPath"] == \
        str(snapshotter.address.parent)
    root_mount = _mount(by_name["snapshotter"].spec, str(snapshotter.root))
    assert root_mount["name"] == work["name"] and root_mount["mountPropagation"] == "HostToContainer"
    assert node_pod.volume(root_mount["name"])["hostPath"]["path"] == root_mount["mountPath"]
