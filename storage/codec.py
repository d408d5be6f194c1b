"""Object <-> bytes.

Mirrors the role of the runtime.Codec that kube-apiserver's etcd3 store uses, plus the versioner's
PrepareObjectForStorage: stored bytes never contain ``metadata.resourceVersion``; decoding stamps the
revision the bytes were read at. JSON via orjson with sorted keys, so that equal objects encode to equal
bytes (guaranteed_update relies on byte equality to skip no-op writes).
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from storage.errors import BadRequestError, InternalError, RequestEntityTooLargeError

#: etcd's default --max-request-bytes (1.5 MiB); larger objects are refused before any write.
MAX_OBJECT_BYTES = 1536 * 1024


class Codec(Protocol):
    """Encodes objects (dicts) for storage and decodes them back, stamping a resourceVersion."""

    def encode(self, obj: dict[str, Any]) -> bytes:
        """Bytes to store for ``obj`` (without its resourceVersion); typed errors for bad objects."""
        ...

    def decode(self, data: bytes, rv: int) -> dict[str, Any]:
        """The object stored as ``data``, stamped with resourceVersion ``rv``."""
        ...


class JSONCodec:
    """Default codec: canonical JSON (orjson, sorted keys), resourceVersion stripped on encode.

    ``max_object_bytes`` bounds the encoded size (default 1.5 MiB, etcd's request limit).
    """

    def __init__(self, max_object_bytes: int = MAX_OBJECT_BYTES) -> None:
        self.max_object_bytes = max_object_bytes

    def encode(self, obj: dict[str, Any]) -> bytes:
        """Encode ``obj`` without its resourceVersion.

        Raises BadRequestError (400) if ``obj`` is not a dict with a dict ``metadata`` or holds values
        JSON cannot represent, RequestEntityTooLargeError (413) if the bytes exceed the limit.
        """
        if not isinstance(obj, dict):
            raise BadRequestError(f"object must be a dict, got {type(obj).__name__}")
        meta = obj.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise BadRequestError("object metadata must be a dict")
        if meta and "resourceVersion" in meta:
            obj = dict(obj)
            obj["metadata"] = {k: v for k, v in meta.items() if k != "resourceVersion"}
        try:
            data = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
        except TypeError as exc:
            raise BadRequestError(f"object is not JSON-serializable: {exc}") from None
        if len(data) > self.max_object_bytes:
            raise RequestEntityTooLargeError(
                f"object is {len(data)} bytes encoded, over the limit of {self.max_object_bytes} bytes")
        return data

    def decode(self, data: bytes, rv: int) -> dict[str, Any]:
        """Decode stored bytes and stamp ``metadata.resourceVersion = str(rv)``.

        Raises InternalError (500) for bytes that are not a JSON object (a corrupt value).
        """
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise InternalError(f"cannot decode stored object: {exc}") from None
        if not isinstance(obj, dict):
            raise InternalError("stored value is not a JSON object")
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            meta = obj["metadata"] = {}
        if rv:
            meta["resourceVersion"] = str(rv)
        return obj

    def encode_event_bytes(self, obj: dict[str, Any]) -> bytes:
        """Serialize an object exactly as handed out (with its resourceVersion), for wire output."""
        return orjson.dumps(obj)
