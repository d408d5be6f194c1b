"""The storage contract: Kubernetes' storage.Interface in Python.

Mirrors k8s.io/apiserver pkg/storage/interfaces.go. Objects are JSON-compatible dicts in Kubernetes
shape; keys are strings like ``/pods/<namespace>/<name>`` under a resource prefix (``/pods``).
Every object a Storage returns carries ``metadata.resourceVersion`` = the revision it was last modified
at; a DELETED event carries the previous object stamped with the deletion revision; a list carries the
snapshot revision.

The public API is async (anyio): it runs under asyncio and trio.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping, Protocol, runtime_checkable

import orjson

from storage.errors import BadRequestError, PreconditionFailedError
from storage.selection import (EVERYTHING_FIELDS, EVERYTHING_LABELS, FieldSelector, LabelSelector,
                               SelectionPredicate, parse_field_selector, parse_label_selector)
from storage.versioner import parse_resource_version

#: Annotation on the BOOKMARK that ends the initial events of a watch-list (KEP-3157).
INITIAL_EVENTS_END_ANNOTATION = "k8s.io/initial-events-end"


class EventType(str, enum.Enum):
    """Watch event types (apimachinery pkg/watch EventType)."""

    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    BOOKMARK = "BOOKMARK"
    ERROR = "ERROR"


class ResourceVersionMatch(str, enum.Enum):
    """How a LIST interprets resource_version (metav1.ResourceVersionMatch). "" is the legacy rule."""

    UNSET = ""
    NOT_OLDER_THAN = "NotOlderThan"
    EXACT = "Exact"


@dataclass(slots=True)
class WatchEvent:
    """One watch event: ``type`` and ``object``.

    ``object`` is the object (ADDED/MODIFIED), the previous object stamped with the deletion revision
    (DELETED), an object carrying only ``metadata.resourceVersion`` (BOOKMARK), or a ``metav1.Status``
    dict (ERROR). Objects from the cache are shared with the cache and all watchers: read-only.
    """

    type: EventType
    object: dict[str, Any]
    _encoded: bytes | None = field(default=None, repr=False, compare=False)

    def encode(self) -> bytes:
        """The event as watch-stream JSON ``{"type": ..., "object": ...}`` (bytes), computed once and
        kept: the cache hands one WatchEvent to every watcher of a change, so they all share one
        serialization (Kubernetes cachingObject, KEP-1152)."""
        if self._encoded is None:
            self._encoded = orjson.dumps({"type": self.type.value, "object": self.object})
        return self._encoded

    @property
    def resource_version(self) -> int:
        """The event's revision (int), 0 for ERROR events or objects without one."""
        rv = (self.object.get("metadata") or {}).get("resourceVersion")
        return int(rv) if rv else 0


@dataclass(frozen=True, slots=True)
class GetOptions:
    """Options of a GET (storage.GetOptions).

    resource_version: "" = most recent (quorum read), "0" = any, "N" = not older than N.
    ignore_not_found: return None instead of raising NotFoundError.
    """

    resource_version: str = ""
    ignore_not_found: bool = False

    def __post_init__(self) -> None:
        parse_resource_version(self.resource_version)


@dataclass(frozen=True)
class ListOptions:
    """Options of a LIST or WATCH (storage.ListOptions plus the SelectionPredicate inputs).

    resource_version / resource_version_match: see the table in reference section 1.3.
    label_selector / field_selector: Kubernetes selector strings (or parsed selectors); malformed
        strings raise BadRequestError (400) when the options are built.
    limit: page size for lists (0 = no limit); continue_token: token from a previous page.
    recursive: the key is a prefix (``/pods/ns`` lists ``/pods/ns/*``, never ``/pods/nsx``).
    allow_watch_bookmarks, send_initial_events (None = legacy), progress_notify (storage-level: surface
        progress notifications as BOOKMARK events): watch options.
    timeout_seconds: a watch ends normally after this many seconds (metav1.ListOptions
        timeoutSeconds; the cache sends a bookmark about 2 s before); None = no deadline.
    """

    resource_version: str = ""
    resource_version_match: str = ""
    label_selector: str | LabelSelector = ""
    field_selector: str | FieldSelector = ""
    limit: int = 0
    continue_token: str = ""
    recursive: bool = False
    allow_watch_bookmarks: bool = False
    send_initial_events: bool | None = None
    progress_notify: bool = False
    timeout_seconds: float | None = None
    predicate: SelectionPredicate = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        labels = (parse_label_selector(self.label_selector) if isinstance(self.label_selector, str)
                  else self.label_selector)
        fields = (parse_field_selector(self.field_selector) if isinstance(self.field_selector, str)
                  else self.field_selector)
        if not isinstance(labels, LabelSelector) or not isinstance(fields, FieldSelector):
            raise BadRequestError("label_selector and field_selector must be strings or parsed selectors")
        if not isinstance(self.continue_token, str):
            raise BadRequestError("continue token must be a string")
        if self.timeout_seconds is not None and not (isinstance(self.timeout_seconds, (int, float))
                                                     and self.timeout_seconds > 0):
            raise BadRequestError(f"timeoutSeconds must be a positive number, got {self.timeout_seconds!r}")
        if not isinstance(self.limit, int) or isinstance(self.limit, bool) or not 0 <= self.limit < 2**63:
            raise BadRequestError(f"limit must be a non-negative integer, got {self.limit!r}")
        try:
            ResourceVersionMatch(self.resource_version_match)
        except ValueError:
            raise BadRequestError(
                f"unknown resourceVersionMatch {self.resource_version_match!r}") from None
        parse_resource_version(self.resource_version)
        object.__setattr__(self, "predicate", SelectionPredicate(
            label=labels or EVERYTHING_LABELS, field=fields or EVERYTHING_FIELDS, limit=self.limit,
            continue_token=self.continue_token, allow_watch_bookmarks=self.allow_watch_bookmarks))

    @property
    def revision(self) -> int:
        """resource_version parsed (0 when "" or "0")."""
        return parse_resource_version(self.resource_version)


@dataclass(frozen=True, slots=True)
class Preconditions:
    """Conditions an update or delete checks against the current object (storage.Preconditions).

    uid / resource_version: when not None, must equal the object's ``metadata.uid`` /
    ``metadata.resourceVersion``; a mismatch raises PreconditionFailedError (409).
    """

    uid: str | None = None
    resource_version: str | None = None

    def check(self, key: str, obj: Mapping[str, Any]) -> None:
        """Raise PreconditionFailedError if ``obj`` at ``key`` does not satisfy the preconditions."""
        meta = obj.get("metadata") or {}
        if self.uid is not None and meta.get("uid") != self.uid:
            raise PreconditionFailedError(
                f"Precondition failed: UID in precondition: {self.uid}, UID in object meta: "
                f"{meta.get('uid', '')} (key {key})")
        if self.resource_version is not None and meta.get("resourceVersion") != self.resource_version:
            raise PreconditionFailedError(
                f"Precondition failed: ResourceVersion in precondition: {self.resource_version}, "
                f"ResourceVersion in object meta: {meta.get('resourceVersion', '')} (key {key})")


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """What an update function learns about the current object (storage.ResponseMeta).

    resource_version: the current object's revision (0 when it does not exist); ttl: seconds or None.
    """

    resource_version: int
    ttl: int | None = None


@dataclass(slots=True)
class ListResult:
    """A LIST response: ``items`` in key order, the list ``resource_version`` (decimal string),
    ``continue_token`` ("" when complete) and ``remaining_item_count`` (None with selectors)."""

    items: list[dict[str, Any]]
    resource_version: str
    continue_token: str = ""
    remaining_item_count: int | None = None

    @property
    def revision(self) -> int:
        """resource_version as an int."""
        return int(self.resource_version) if self.resource_version else 0


@dataclass(frozen=True, slots=True)
class Stats:
    """storage.Stats: object count and estimated average object size (bytes, 0 when unknown)."""

    object_count: int
    estimated_average_object_size_bytes: int = 0


#: try_update(current, meta) -> new object, or (new object, ttl seconds or None). The current object is
#: the caller's own copy and may be mutated. Raising aborts the update with nothing written.
UpdateFunc = Callable[[dict[str, Any], ResponseMeta], "dict[str, Any] | tuple[dict[str, Any], int | None]"]
#: validate_deletion(current) raises to refuse a delete.
ValidateDeletionFunc = Callable[[dict[str, Any]], None]
#: attrs(obj) -> (labels, fields) used by label and field selectors.
AttrsFunc = Callable[[dict[str, Any]], "tuple[Mapping[str, str], Mapping[str, str]]"]


def _get_path(obj: Mapping[str, Any], dotted: str) -> str:
    cur: Any = obj
    for part in dotted.split("."):
        if not isinstance(cur, Mapping):
            return ""
        cur = cur.get(part)
        if cur is None:
            return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


@dataclass(frozen=True)
class Resource:
    """Per-resource configuration shared by backends and the cache.

    prefix: registry key prefix, e.g. ``/pods`` (must start with "/", not be "/").
    namespaced: keys are ``prefix/<namespace>/<name>`` (else ``prefix/<name>``).
    field_paths: dotted object paths exposed to field selectors besides ``metadata.name`` and
        ``metadata.namespace`` (pods: ``spec.nodeName``, ``status.phase``).
    attrs_func: overrides how (labels, fields) are computed from an object.
    trigger_field: the field the cache indexes watchers by (pods: ``spec.nodeName``).
    index_fields: fields the cache indexes for LIST (pods: ``spec.nodeName``).

    Mirrors the per-resource parts of cacher.Config and the registry's KeyFunc / GetAttrs.
    """

    prefix: str
    namespaced: bool = True
    field_paths: tuple[str, ...] = ()
    attrs_func: AttrsFunc | None = None
    trigger_field: str | None = None
    index_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or self.prefix == "/" or self.prefix.endswith("/"):
            raise ValueError(f"resource prefix must start with '/', not end with '/': {self.prefix!r}")

    def key_for(self, obj: Mapping[str, Any]) -> str:
        """Key of ``obj`` (NamespaceKeyFunc / NoNamespaceKeyFunc). Raises BadRequestError if unnamed."""
        meta = obj.get("metadata")
        meta = meta if isinstance(meta, Mapping) else {}
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequestError("object has no metadata.name")
        if self.namespaced:
            ns = meta.get("namespace")
            if not isinstance(ns, str) or not ns:
                raise BadRequestError("namespaced object has no metadata.namespace")
            return f"{self.prefix}/{ns}/{name}"
        return f"{self.prefix}/{name}"

    def attrs(self, obj: Mapping[str, Any]) -> tuple[Mapping[str, str], Mapping[str, str]]:
        """(labels, fields) of ``obj`` for selectors; computed once per object by the cache."""
        if self.attrs_func is not None:
            return self.attrs_func(obj)
        meta = obj.get("metadata")
        meta = meta if isinstance(meta, Mapping) else {}
        fields = {"metadata.name": str(meta.get("name") or "")}
        if self.namespaced:
            fields["metadata.namespace"] = str(meta.get("namespace") or "")
        for path in self.field_paths:
            fields[path] = _get_path(obj, path)
        labels = meta.get("labels")
        if not isinstance(labels, Mapping):
            return {}, fields
        if all(isinstance(v, str) for v in labels.values()):
            return labels, fields
        # Objects written around this library may carry odd labels; selectors only see strings.
        return {str(k): v for k, v in labels.items() if isinstance(v, str)}, fields

    def validate_object(self, key: str, obj: Any) -> None:
        """Check that ``obj`` may be stored at the (prepared) ``key``: a dict whose ``metadata`` is a
        dict, whose name (and namespace, when namespaced) are non-empty strings that give exactly
        ``key`` (so the cache files it where storage does), and whose labels and annotations, when
        present, map strings to strings. Kubernetes' registry guarantees this before storage; a
        library has to check it. Raises BadRequestError (400)."""
        if not isinstance(obj, dict):
            raise BadRequestError(f"object must be a dict, got {type(obj).__name__}")
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            raise BadRequestError("object metadata must be a dict")
        for field_name in ("labels", "annotations"):
            value = meta.get(field_name)
            if value is None:
                continue
            if not isinstance(value, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                raise BadRequestError(f"metadata.{field_name} must map strings to strings")
        expected = self.key_for(obj)
        if expected != key:
            raise BadRequestError(f"object's name and namespace give key {expected!r}, not {key!r}")

    def prepare_key(self, key: str, recursive: bool = False) -> str:
        """Validate ``key`` and return it; recursive keys get a trailing "/" (storage.PrepareKey).

        Raises BadRequestError (400) for a non-string or empty key, "/" , a key with "." or ".."
        segments, or one outside the resource prefix.
        """
        if not isinstance(key, str):
            raise BadRequestError(f"invalid key {key!r}: must be a string")
        if not key or key == "/":
            raise BadRequestError(f"invalid key {key!r}: empty")
        if "\x00" in key:
            raise BadRequestError(f"invalid key {key!r}: NUL characters are not allowed")
        if any(seg in (".", "..") for seg in key.split("/")):
            raise BadRequestError(f"invalid key {key!r}: '.' and '..' segments are not allowed")
        if key != self.prefix and not key.startswith(self.prefix + "/"):
            raise BadRequestError(f"invalid key {key!r}: not under resource prefix {self.prefix!r}")
        if recursive and not key.endswith("/"):
            return key + "/"
        return key


def validate_list_options(opts: ListOptions, key_prefix: str) -> tuple[int, str]:
    """Interpret a LIST's resource version rules for a storage read (storage.ValidateListOptions).

    Returns ``(with_rev, continue_key)``: ``with_rev`` > 0 means read exactly at that revision, 0 means
    read the latest (NotOlderThan checks happen after the read); ``continue_key`` is the absolute key to
    resume at ("" when not continuing). A token with rv -1 yields with_rev 0 (latest).

    Raises BadRequestError (400) for a resource version or match given with a continue token, a
    malformed token, ``Exact`` with rv "0"/"", ``NotOlderThan`` without rv; InvalidError (422) for a
    malformed resource version.
    """
    from storage.continue_token import decode_continue

    rvm = opts.resource_version_match
    rv = opts.revision
    if opts.continue_token:
        if not opts.recursive:
            raise BadRequestError("continue is only allowed on recursive lists")
        if opts.resource_version not in ("", "0"):
            raise BadRequestError("specifying resource version is not allowed when using continue")
        if rvm:
            raise BadRequestError("resourceVersionMatch is forbidden when continue is provided")
        continue_key, token_rv = decode_continue(opts.continue_token, key_prefix)
        return (token_rv if token_rv > 0 else 0), continue_key
    if rvm == ResourceVersionMatch.EXACT:
        if rv == 0:
            raise BadRequestError("resourceVersionMatch=Exact requires a resourceVersion other than \"\" and \"0\"")
        return rv, ""
    if rvm == ResourceVersionMatch.NOT_OLDER_THAN:
        if opts.resource_version == "":
            raise BadRequestError("resourceVersionMatch is forbidden unless resourceVersion is provided")
        return 0, ""
    if opts.recursive and opts.limit > 0 and rv > 0:
        return rv, ""  # legacy: limit with resourceVersion N means an exact read
    return 0, ""


def validate_watch_options(opts: ListOptions) -> None:
    """Apply the watch option rules of apimachinery's meta/internalversion validation.

    send_initial_events requires resource_version_match NotOlderThan, and NotOlderThan on a watch
    requires send_initial_events; Exact is never valid on a watch; continue tokens are not allowed.
    Raises BadRequestError (400).
    """
    rvm = opts.resource_version_match
    if opts.continue_token:
        raise BadRequestError("continue is not allowed on a watch")
    if opts.send_initial_events is not None:
        if rvm != ResourceVersionMatch.NOT_OLDER_THAN:
            raise BadRequestError("sendInitialEvents requires resourceVersionMatch=NotOlderThan")
    elif rvm:
        raise BadRequestError("resourceVersionMatch is forbidden for watch unless sendInitialEvents is set")


@runtime_checkable
class Watch(Protocol):
    """An open watch: an async context manager and an async iterator of WatchEvent.

    ``stop()`` is idempotent and frees the stream's resources. ``next_batch()`` returns the next
    non-empty list of events, or [] once the watch has ended (after an ERROR event, if any).
    """

    async def __aenter__(self) -> "Watch": ...

    async def __aexit__(self, *exc: object) -> None: ...

    def __aiter__(self) -> AsyncIterator[WatchEvent]: ...

    async def next_batch(self) -> list[WatchEvent]:
        """The next non-empty list of events, or [] once the watch has ended."""
        ...

    async def stop(self) -> None:
        """End the watch and free its stream; idempotent."""
        ...


@runtime_checkable
class Storage(Protocol):
    """Kubernetes storage.Interface, async, for one resource (``resource.prefix``).

    Every Storage is an async context manager: leaving it (or ``await close()``) releases every
    connection, thread and task it holds; calls after that raise StorageClosedError (503).
    """

    resource: Resource

    async def __aenter__(self) -> "Storage": ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def close(self) -> None:
        """Release every connection, thread and task; idempotent."""
        ...

    async def create(self, key: str, obj: dict[str, Any], ttl: int = 0) -> dict[str, Any]:
        """Store ``obj`` at ``key`` unless it exists; return it with its resourceVersion.

        ttl: seconds, 0 = forever. Raises AlreadyExistsError (409), BadRequestError if ``obj`` carries
        a resourceVersion, RequestEntityTooLargeError (413) if it is too large.
        """
        ...

    async def get(self, key: str, opts: GetOptions = GetOptions()) -> dict[str, Any] | None:
        """Return the object at ``key`` (NotOlderThan opts.resource_version).

        Raises NotFoundError (404) unless ignore_not_found (then None), TooLargeResourceVersionError
        (504) when the version is ahead of the storage.
        """
        ...

    async def get_list(self, key: str, opts: ListOptions = ListOptions()) -> ListResult:
        """List ``key`` (a prefix when opts.recursive) with selectors, paging and RV rules (section 1.3)."""
        ...

    async def guaranteed_update(self, key: str, try_update: UpdateFunc, *, ignore_not_found: bool = False,
                                preconditions: Preconditions | None = None,
                                cached_existing: dict[str, Any] | None = None) -> dict[str, Any]:
        """Read-modify-write with optimistic concurrency until it commits; a no-op writes nothing."""
        ...

    async def delete(self, key: str, *, preconditions: Preconditions | None = None,
                     validate_deletion: ValidateDeletionFunc | None = None,
                     cached_existing: dict[str, Any] | None = None) -> dict[str, Any]:
        """Delete ``key``; return the last object stamped with the deletion revision."""
        ...

    def watch(self, key: str, opts: ListOptions = ListOptions()) -> Watch:
        """Open a watch on ``key`` (a prefix when recursive): events with revision > resource_version."""
        ...

    async def stats(self) -> Stats:
        """Object count under the resource prefix (storage.Interface Stats)."""
        ...

    async def readiness_check(self) -> None:
        """Raise a typed error (429 while a cache initialises, 503 when closed) unless ready."""
        ...

    async def request_watch_progress(self) -> None:
        """Ask for a progress notification on open watches (etcd RequestProgress)."""
        ...

    async def get_current_resource_version(self) -> int:
        """The storage's current revision via a quorum read (int)."""
        ...

    def compact_revision(self) -> int:
        """The latest compaction revision observed (0 if none)."""
        ...
