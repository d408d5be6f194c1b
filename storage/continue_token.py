"""Continue tokens for paged lists.

Mirrors k8s.io/apiserver pkg/storage/continue.go: the token is base64url (no padding) of the JSON
``{"v": "meta.k8s.io/v1", "rv": <int64>, "start": "<key relative to the list prefix>"}``. Because
``start`` is relative to the key prefix, a token issued by the cache (keys like ``/pods/ns/name``) is
valid against etcd (keys like ``/registry/pods/ns/name``) and the other way round.
"""

from __future__ import annotations

import base64
import binascii
import posixpath

import orjson

from storage.errors import BadRequestError

TOKEN_VERSION = "meta.k8s.io/v1"


def encode_continue(next_key: str, key_prefix: str, rv: int) -> str:
    """Build a token that resumes a list at ``next_key`` (absolute key) read at revision ``rv``.

    ``key_prefix`` is the list's prefix (with trailing "/"); ``next_key`` must start with it. ``rv`` is
    the list's snapshot revision (> 0), or -1 for "continue at the latest revision" (after compaction).
    Raises ValueError if ``next_key`` is outside the prefix (a programming error, not user input).
    """
    if not next_key.startswith(key_prefix):
        raise ValueError(f"continue key {next_key!r} is not under {key_prefix!r}")
    payload = {"v": TOKEN_VERSION, "rv": rv, "start": next_key[len(key_prefix):]}
    return base64.urlsafe_b64encode(orjson.dumps(payload)).rstrip(b"=").decode("ascii")


def decode_continue(token: str, key_prefix: str) -> tuple[str, int]:
    """Decode a token into ``(absolute start key, rv)``.

    ``rv`` > 0 means "read at exactly this revision"; ``rv`` < 0 means "read at the latest revision".
    Raises BadRequestError (400) for anything malformed or tampered: bad base64 or JSON, a wrong
    version, ``rv == 0``, an empty start, or a start that path-cleaning would change (path traversal).
    """
    try:
        raw = token.encode("ascii")
        raw += b"=" * (-len(raw) % 4)
        data = orjson.loads(base64.urlsafe_b64decode(raw))
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        raise BadRequestError(f"invalid continue token: {exc}") from None
    if not isinstance(data, dict) or data.get("v") != TOKEN_VERSION:
        raise BadRequestError("invalid continue token: unsupported version")
    rv, start = data.get("rv"), data.get("start")
    if not isinstance(rv, int) or isinstance(rv, bool) or rv == 0:
        raise BadRequestError("invalid continue token: incorrect encoded start resourceVersion")
    if not isinstance(start, str) or not start:
        raise BadRequestError("invalid continue token: encoded start key is empty")
    # The start key is joined to the prefix, so it must not be able to climb out of it.
    if start.startswith("/") or any(seg in (".", "..") for seg in start.split("/")) \
            or posixpath.normpath(start) != start:
        raise BadRequestError("invalid continue token: start key is not a clean relative path")
    return key_prefix + start, rv
