"""resourceVersion parsing and stamping.

Mirrors k8s.io/apiserver pkg/storage/api_object_versioner.go (APIObjectVersioner): resourceVersion is an
opaque decimal string to clients and an unsigned 64-bit integer (the etcd revision) inside. "" and "0"
both mean "unset" (0).
"""

from __future__ import annotations

from typing import Any

from storage.errors import InvalidError

MAX_RESOURCE_VERSION = 2**63 - 1  # etcd revisions are int64


def parse_resource_version(value: str | int | None) -> int:
    """Parse a resourceVersion string into a revision (int >= 0).

    ``None``, ``""`` and ``"0"`` return 0 ("unset / any"). Anything that is not a plain decimal number
    without sign, spaces or leading ``+`` (``"abc"``, ``"-1"``, ``"1.5"``, ``" 5"``) or that exceeds int64
    raises InvalidError (422), like storage.ParseResourceVersion. An int is accepted if non-negative.
    """
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise InvalidError(f"invalid resource version {value!r}", field="metadata.resourceVersion")
    if isinstance(value, int):
        rv = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        rv = int(value)
    else:
        raise InvalidError(f"invalid resource version {value!r}: must be a decimal unsigned integer",
                           field="metadata.resourceVersion")
    if rv < 0 or rv > MAX_RESOURCE_VERSION:
        raise InvalidError(f"invalid resource version {value!r}: out of range",
                           field="metadata.resourceVersion")
    return rv


def format_resource_version(rv: int) -> str:
    """Render a revision as a resourceVersion string; 0 renders as "" (unset)."""
    return str(rv) if rv else ""


def object_resource_version(obj: dict[str, Any]) -> int:
    """Return ``metadata.resourceVersion`` of an object as an int (0 when unset).

    Raises InvalidError for a malformed value.
    """
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return 0
    return parse_resource_version(meta.get("resourceVersion"))


def with_resource_version(obj: dict[str, Any], rv: int) -> dict[str, Any]:
    """Return a shallow copy of ``obj`` whose ``metadata`` is copied and carries resourceVersion ``rv``.

    The input is never mutated: objects handed out by the cache are shared, so stamping a new version
    (e.g. a DELETED event's previous object at the deletion revision) must copy first.
    """
    out = dict(obj)
    meta = dict(obj.get("metadata") or {})
    if rv:
        meta["resourceVersion"] = str(rv)
    else:
        meta.pop("resourceVersion", None)
    out["metadata"] = meta
    return out
