"""How a supervised-backend message (protocol.py) becomes a frame body and back.

Each message is a frozen dataclass registered under its `op`; `Message.to_json()` makes the frame body
afsd/ondemand/_wire.py sends (a JSON object whose "op" names the class), and `parse()` turns a received
frame back into the class, checking every field's type against the class's type hints: a frame that does
not fit is a ProtocolError naming the field, never a KeyError deep in a daemon.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, Union

from afsd.ondemand._wire import ProtocolError
from afsd.ondemand.spec import BlobSpec

M = TypeVar("M", bound="Message")
MESSAGES: dict[str, type[Message]] = {}


def message(op: str) -> Callable[[type[M]], type[M]]:
    """Register a message class under the `op` its frames carry."""

    def register(cls: type[M]) -> type[M]:
        if op in MESSAGES:
            raise TypeError(f"two messages named {op!r}")
        cls.op = op
        MESSAGES[op] = cls
        return cls
    return register


@dataclass(frozen=True, kw_only=True)
class Message:
    op: ClassVar[str] = ""
    id: int = 0          # a request's id, echoed by its Reply (0: no reply expected or matched)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, **encode(self)}


def parse(frame: dict[str, Any]) -> Message:
    """The message a received frame carries; ProtocolError when it is unknown or malformed."""
    op = frame.get("op")
    cls = MESSAGES.get(op) if isinstance(op, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message {op!r}")
    return _decoder(cls)({key: value for key, value in frame.items() if key not in ("op", "nfds")}, op)


def parse_as(frame: dict[str, Any], cls: type[M]) -> M:
    """`parse`, requiring a message of type `cls`."""
    parsed = parse(frame)
    if not isinstance(parsed, cls):
        raise ProtocolError(f"expected {cls.op!r}, got {parsed.op!r}")
    return parsed


_PLAIN = frozenset({str, int, float, bool, type(None)})   # exact types: enums (str/int subclasses) are not plain
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def encode(value: Any) -> Any:
    """Any message part (a status, a spec, ...) as plain JSON values."""
    if type(value) in _PLAIN:
        return value
    if isinstance(value, BlobSpec):
        return value.to_json()
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = _FIELD_NAMES.get(type(value))
        if names is None:
            names = _FIELD_NAMES[type(value)] = tuple(item.name for item in dataclasses.fields(value))
        return {name: encode(getattr(value, name)) for name in names}
    if isinstance(value, dict):
        return {key: encode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(item) for item in value]
    return value


# Decoding: one function per type, made once from its type hints (messages cross the fetch path's hot
# loop: a miss costs four of them), each checking what it is given and naming the field that is wrong.
Decoder = Callable[[Any, str], Any]
_DECODERS: dict[Any, Decoder] = {}


def _decoder(kind: Any) -> Decoder:
    decoder = _DECODERS.get(kind)
    if decoder is None:
        decoder = _DECODERS[kind] = _make_decoder(kind)
    return decoder


def _make_decoder(kind: Any) -> Decoder:
    origin = typing.get_origin(kind)
    if kind is Any:
        return lambda value, where: value
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        (inner_kind,) = [option for option in options if option is not type(None)]
        inner = _decoder(inner_kind)
        optional = type(None) in options
        return lambda value, where: None if value is None and optional else inner(value, where)
    if origin is list:
        (item_kind,) = typing.get_args(kind)
        item = _decoder(item_kind)

        def decode_list(value: Any, where: str) -> Any:
            _expect(isinstance(value, list), "a list", value, where)
            return [item(element, f"{where}[{index}]") for index, element in enumerate(value)]
        return decode_list
    if origin is dict:
        _, item_kind = typing.get_args(kind)
        item = _decoder(item_kind)

        def decode_dict(value: Any, where: str) -> Any:
            _expect(isinstance(value, dict) and all(isinstance(k, str) for k in value), "an object", value, where)
            return {key: item(element, f"{where}.{key}") for key, element in value.items()}
        return decode_dict
    if kind is BlobSpec:
        def decode_spec(value: Any, where: str) -> Any:
            _expect(isinstance(value, dict), "a blob spec", value, where)
            try:
                return BlobSpec.from_json(value)
            except (KeyError, ValueError, TypeError) as e:
                raise ProtocolError(f"{where}: not a valid blob spec ({e!r})") from None
        return decode_spec
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        def decode_enum(value: Any, where: str) -> Any:
            try:
                return kind(value)
            except ValueError:
                raise ProtocolError(f"{where}: {value!r} is not a {kind.__name__}") from None
        return decode_enum
    if dataclasses.is_dataclass(kind):
        return _dataclass_decoder(kind)
    if kind is float:
        def decode_float(value: Any, where: str) -> Any:
            _expect(isinstance(value, (int, float)) and not isinstance(value, bool), "a number", value, where)
            return float(value)
        return decode_float
    if kind is int:
        def decode_int(value: Any, where: str) -> Any:
            _expect(isinstance(value, int) and not isinstance(value, bool), "an integer", value, where)
            return value
        return decode_int

    def decode_plain(value: Any, where: str) -> Any:
        _expect(isinstance(value, kind), kind.__name__, value, where)
        return value
    return decode_plain


def _dataclass_decoder(kind: type) -> Decoder:
    hints = typing.get_type_hints(kind)
    fields = {item.name: _LazyDecoder(hints[item.name]) for item in dataclasses.fields(kind) if item.init}
    required = tuple(item.name for item in dataclasses.fields(kind) if item.init
                     and item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING)

    def decode_dataclass(value: Any, where: str) -> Any:
        _expect(isinstance(value, dict), "an object", value, where)
        arguments = {}
        for name, item in value.items():
            field_decoder = fields.get(name)
            if field_decoder is not None:   # unknown fields are ignored: a newer peer may add some
                arguments[name] = field_decoder(item, f"{where}.{name}")
        missing = [name for name in required if name not in arguments]
        if missing:
            raise ProtocolError(f"{where}: missing {', '.join(missing)}")
        return kind(**arguments)
    return decode_dataclass


class _LazyDecoder:
    """A field's decoder, made at its first use (a dataclass may name types defined after it)."""

    __slots__ = ("kind", "decoder")

    def __init__(self, kind: Any) -> None:
        self.kind = kind
        self.decoder: Decoder | None = None

    def __call__(self, value: Any, where: str) -> Any:
        if self.decoder is None:
            self.decoder = _decoder(self.kind)
        return self.decoder(value, where)


def _expect(ok: bool, what: str, value: Any, where: str) -> None:
    if not ok:
        raise ProtocolError(f"{where}: expected {what}, got {type(value).__name__}")
