"""containerd's filter expressions as `afsd snapshotter`'s List understands them (pure parsing)."""

from __future__ import annotations

import pytest

from afsd.snapshotter.filters import FilterSyntaxError, parse_filters, snapshot_fields

TARGET = "sha256:" + "a" * 64
REMOTE = snapshot_fields(TARGET, "k8s.io/5/sha256:" + "b" * 64, "committed",
                         {"containerd.io/snapshot.ref": TARGET, "a.b": "x y", "empty": ""})


def matches(*filters: str) -> bool:
    return parse_filters(filters).matches(REMOTE)


def test_the_filter_containerd_uses_to_find_a_remote_snapshot() -> None:
    # metadata/snapshot.go: labels."containerd.io/snapshot.ref"==%s,parent==%q
    parent = "k8s.io/5/sha256:" + "b" * 64
    assert matches(f'labels."containerd.io/snapshot.ref"=={TARGET},parent=="{parent}"')
    assert not matches(f'labels."containerd.io/snapshot.ref"=={TARGET},parent=="k8s.io/6/other"')


@pytest.mark.parametrize("expression, expected", [
    ("", True),
    ("kind==committed", True),
    ("kind!=committed", False),
    ("labels.a.b", True),                       # the rest of a path joined with dots is the key
    ('labels."a.b"=="x y"', True),
    ("labels.missing", False),
    ("labels.missing!=x", True),
    ("labels.empty", True),                     # present, if empty
    ("name~=^sha256:a+$", True),
    ("name~=/^sha256:[a-f]{64}$/", True),
    ("name~=|sha256|", True),
    ('name=="sha256:\\x61' + "a" * 63 + '"', True),
    ("  kind == committed , name ~= sha ", True),
    ("unknownfield", False),
])
def test_selectors(expression: str, expected: bool) -> None:
    assert matches(expression) is expected


def test_any_filter_string_may_match_but_every_selector_of_one_must() -> None:
    assert matches("kind==view", "kind==committed")
    assert not matches("kind==view", "kind==committed,name==other")
    assert matches()


@pytest.mark.parametrize("expression", ["kind=", "kind==", "kind=committed", '"unterminated', "name~=(",
                                        ",kind", "kind==a b", 'name=="\\q"'])
def test_malformed_filters_are_refused_with_the_position(expression: str) -> None:
    with pytest.raises(FilterSyntaxError, match="invalid filter .* at position"):
        parse_filters([expression])
