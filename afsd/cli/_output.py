"""Output for scripts: protobuf answers as JSON whose numbers are JSON numbers.

protobuf's JSON mapping writes 64-bit integers as strings (`"size": "4022272"`), for JavaScript's sake;
`afsd ... --json` is read by scripts and jq, where a size must compare as a number.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

_INT64 = {FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64}


def message_json(message: Message, *, with_defaults: bool = False) -> dict[str, Any]:
    """`message` as a JSON-ready dict with proto field names, 64-bit integers as numbers."""
    document = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=with_defaults)
    return _numbers(message.DESCRIPTOR, document)


def print_json(message: Message, *, with_defaults: bool = False) -> None:
    json.dump(message_json(message, with_defaults=with_defaults), sys.stdout, indent=2)
    print()


def _numbers(descriptor: Descriptor, document: dict[str, Any]) -> dict[str, Any]:
    for field in descriptor.fields:
        if field.name not in document:
            continue
        value = document[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            document[field.name] = {key: _value(value_field, item) for key, item in value.items()}
        elif field.is_repeated:
            document[field.name] = [_value(field, item) for item in value]
        else:
            document[field.name] = _value(field, value)
    return document


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.cpp_type in _INT64 and isinstance(value, str):
        return int(value)
    if field.message_type is not None and isinstance(value, dict) and field.message_type.full_name not in (
            "google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.Timestamp", "google.protobuf.Duration"):
        return _numbers(field.message_type, value)
    return value
