"""The gRPC API files: generated code is current, and the user-facing services stay wire-compatible
with the published afs-sdk client (the one existing users of the Go AFS already run)."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2, json_format

from afsd.api import afslet_pb2, afsproxy_pb2

REPO = Path(__file__).resolve().parents[1]

_DUMP_SDK = """
import json, sys
from google.protobuf import descriptor_pb2, json_format
from afs_sdk.api.afslet.v1 import afslet_pb2
from afs_sdk.api.afsproxy.v1 import afsproxy_pb2
out = {}
for name, module in (("afslet", afslet_pb2), ("afsproxy", afsproxy_pb2)):
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    out[name] = json_format.MessageToDict(proto)
json.dump(out, sys.stdout)
"""


def _sdk_descriptors() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    # A separate interpreter: the SDK and afsd define the same symbols, which one descriptor pool
    # refuses to hold twice.
    output = subprocess.run([sys.executable, "-c", _DUMP_SDK], check=True, capture_output=True,
                            text=True).stdout
    result = {}
    for name, document in json.loads(output).items():
        result[name] = json_format.ParseDict(document, descriptor_pb2.FileDescriptorProto())
    return result


def _ours(module) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    return proto


def _fields(message: descriptor_pb2.DescriptorProto) -> dict[int, tuple]:
    return {f.number: (f.name, f.type, f.label, f.type_name,
                       message.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None)
            for f in message.field}


def _wire_differences(sdk: descriptor_pb2.FileDescriptorProto,
                      ours: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """What a client built from `sdk` would see differently from a server built from `ours`.

    Extra fields and messages on our side are compatible; anything the SDK has must match exactly.
    """
    problems = []
    if sdk.package != ours.package:
        problems.append(f"package {ours.package!r} != {sdk.package!r}")
    our_messages = {m.name: m for m in ours.message_type}
    for message in sdk.message_type:
        if message.name not in our_messages:
            problems.append(f"message {message.name} missing")
            continue
        mine = _fields(our_messages[message.name])
        for number, spec in _fields(message).items():
            if mine.get(number) != spec:
                problems.append(f"{message.name} field {number}: {mine.get(number)} != {spec}")
    our_enums = {e.name: {v.name: v.number for v in e.value} for e in ours.enum_type}
    for enum in sdk.enum_type:
        if our_enums.get(enum.name) != {v.name: v.number for v in enum.value}:
            problems.append(f"enum {enum.name} differs")
    our_services = {s.name: {m.name: m for m in s.method} for s in ours.service}
    for service in sdk.service:
        methods = our_services.get(service.name, {})
        for method in service.method:
            mine = methods.get(method.name)
            if mine is None:
                problems.append(f"rpc {service.name}.{method.name} missing")
                continue
            for attribute in ("input_type", "output_type", "client_streaming", "server_streaming"):
                if getattr(mine, attribute) != getattr(method, attribute):
                    problems.append(f"rpc {service.name}.{method.name} {attribute} differs")
    return problems


def test_afslet_and_proxy_services_match_the_published_afs_sdk() -> None:
    sdk = _sdk_descriptors()
    assert sdk["afslet"].message_type, "could not read the SDK's descriptors"
    assert _wire_differences(sdk["afslet"], _ours(afslet_pb2)) == []
    assert _wire_differences(sdk["afsproxy"], _ours(afsproxy_pb2)) == []


def test_the_compatibility_check_notices_a_renumbered_field() -> None:
    sdk = _sdk_descriptors()["afslet"]
    ours = _ours(afslet_pb2)
    start = next(m for m in ours.message_type if m.name == "StartRequest")
    next(f for f in start.field if f.name == "env").number = 99
    assert any("StartRequest field 15" in p for p in _wire_differences(sdk, ours))


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run([str(REPO / "scripts" / "gen-protos.sh"), str(tmp_path)], check=True,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, cwd=REPO)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert generated, "protoc produced nothing"
    stale = [str(p) for p in generated if not filecmp.cmp(tmp_path / p, REPO / p, shallow=False)]
    assert stale == [], f"run scripts/gen-protos.sh: {stale} are out of date"
