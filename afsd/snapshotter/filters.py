"""containerd's filter expressions, as the snapshots API's List carries them.

containerd asks a snapshotter for snapshots with filters such as
`labels."containerd.io/snapshot.ref"==sha256:...,parent=="k8s.io/5/sha256:..."` (how its metadata
store finds the snapshot a remote snapshotter committed). The grammar is containerd's
(filters/parser.go):

    filters   := one or more filter strings; a snapshot matching ANY of them is listed
    filter    := selector ("," selector)*          every selector must match
    selector  := fieldpath [operator value]        without an operator: the field is present
    fieldpath := field ("." field)*                field: [A-Za-z0-9_]+ or a quoted string
    operator  := "==" | "!=" | "~="                "~=": the value is a regular expression
    value     := quoted | any run of characters up to "," (no spaces)
    quoted    := "..." or /.../ or |...| with backslash escapes

The fields of a snapshot are `name`, `parent`, `kind` (active, view, committed) and
`labels.<key>` (the key is the rest of the path joined with dots).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from afsd.errors import AfsdError

_QUOTES = '"/|'
_FIELD = re.compile(r"[A-Za-z0-9_]+")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "/": "/", "|": "|", "a": "\a", "b": "\b",
            "f": "\f", "v": "\v"}

# The value of a field of the thing being filtered, or None when it has no such field.
FieldLookup = Callable[[Sequence[str]], "str | None"]


class FilterSyntaxError(AfsdError):
    """A filter expression that does not parse."""


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str = ""            # "" (present), "==", "!=" or "~="
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def matches(self, lookup: FieldLookup) -> bool:
        found = lookup(self.fieldpath)
        if not self.operator:
            return found is not None
        if self.operator == "!=":
            return found != self.value
        if found is None:
            return False
        if self.operator == "==":
            return found == self.value
        assert self.pattern is not None
        return self.pattern.search(found) is not None


@dataclass(frozen=True)
class Filter:
    """Filter strings: matches when any of them does (all selectors of that one)."""

    alternatives: tuple[tuple[Selector, ...], ...]

    def matches(self, lookup: FieldLookup) -> bool:
        return not self.alternatives or any(all(s.matches(lookup) for s in selectors)
                                            for selectors in self.alternatives)


def parse_filters(texts: Sequence[str]) -> Filter:
    """Parse containerd filter strings (none, or an empty one, matches everything)."""
    alternatives = []
    for text in texts:
        if not text:
            return Filter(())
        alternatives.append(_Parser(text).selectors())
    return Filter(tuple(alternatives))


def snapshot_fields(name: str, parent: str, kind: str, labels: Mapping[str, str]) -> FieldLookup:
    """The lookup for a snapshot, as containerd's snapshot storage adapts one."""
    def lookup(fieldpath: Sequence[str]) -> str | None:
        if not fieldpath:
            return None
        head = fieldpath[0]
        if head == "name":
            return name
        if head == "parent":
            return parent
        if head == "kind":
            return kind
        if head == "labels":
            return labels.get(".".join(fieldpath[1:]))
        return None
    return lookup


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, why: str) -> FilterSyntaxError:
        return FilterSyntaxError(f"invalid filter {self.text[:200]!r} at position {self.pos}: {why}")

    def skip_spaces(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def selectors(self) -> tuple[Selector, ...]:
        selectors = [self.selector()]
        while True:
            self.skip_spaces()
            if self.pos == len(self.text):
                return tuple(selectors)
            if self.text[self.pos] != ",":
                raise self.fail("expected ',' between selectors")
            self.pos += 1
            selectors.append(self.selector())

    def selector(self) -> Selector:
        fieldpath = [self.field()]
        while self.pos < len(self.text) and self.text[self.pos] == ".":
            self.pos += 1
            fieldpath.append(self.field())
        self.skip_spaces()
        operator = self.text[self.pos:self.pos + 2]
        if operator not in ("==", "!=", "~="):
            if self.pos < len(self.text) and self.text[self.pos] in "=!~":
                raise self.fail("expected ==, != or ~=")
            return Selector(tuple(fieldpath))
        self.pos += 2
        value = self.value()
        pattern = None
        if operator == "~=":
            try:
                pattern = re.compile(value)
            except re.error as error:
                raise self.fail(f"bad regular expression {value!r}: {error}") from None
        return Selector(tuple(fieldpath), operator, value, pattern)

    def field(self) -> str:
        self.skip_spaces()
        if self.pos < len(self.text) and self.text[self.pos] in _QUOTES:
            return self.quoted()
        match = _FIELD.match(self.text, self.pos)
        if match is None:
            raise self.fail("expected a field name")
        self.pos = match.end()
        return match.group()

    def value(self) -> str:
        self.skip_spaces()
        if self.pos < len(self.text) and self.text[self.pos] in _QUOTES:
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] != "," and not self.text[self.pos].isspace():
            self.pos += 1
        if self.pos == start:
            raise self.fail("expected a value")
        return self.text[start:self.pos]

    def quoted(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out = []
        while True:
            if self.pos >= len(self.text) or self.text[self.pos] == "\n":
                raise self.fail("quoted string not terminated")
            char = self.text[self.pos]
            self.pos += 1
            if char == quote:
                return "".join(out)
            if char != "\\":
                out.append(char)
                continue
            out.append(self.escape())

    def escape(self) -> str:
        if self.pos >= len(self.text):
            raise self.fail("quoted string not terminated")
        char = self.text[self.pos]
        self.pos += 1
        if char in _ESCAPES:
            return _ESCAPES[char]
        width = {"x": 2, "u": 4, "U": 8}.get(char)
        if width is None:
            raise self.fail(f"unknown escape \\{char}")
        digits = self.text[self.pos:self.pos + width]
        if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
            raise self.fail(f"bad \\{char} escape")
        self.pos += width
        return chr(int(digits, 16))
