"""Typed storage errors, each carrying what an API server needs to answer a client.

Mirrors k8s.io/apiserver pkg/storage/errors.go (storage error codes) together with the HTTP mapping of
pkg/storage/errors/storage.go and apimachinery's StatusError: every error has an HTTP ``status``, a
Kubernetes ``reason``, a human ``message`` and, where Kubernetes sends one, ``retry_after_seconds``.
``to_status()`` renders the ``metav1.Status`` object that an open watch sends as its final ERROR event.
"""

from __future__ import annotations

from typing import Any


class StorageError(Exception):
    """Base of every error this library raises on purpose.

    Attributes:
        status: HTTP status code (int), e.g. 404.
        reason: Kubernetes ``StatusReason`` string, e.g. ``"NotFound"``.
        message: human-readable message.
        retry_after_seconds: seconds a client should wait before retrying, or None.
        causes: list of ``{"reason": ..., "message": ..., "field": ...}`` dicts (Status details causes).
    """

    status = 500
    reason = "InternalError"

    def __init__(self, message: str, *, retry_after_seconds: int | None = None,
                 causes: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_seconds = retry_after_seconds
        self.causes = list(causes or [])

    def to_status(self) -> dict[str, Any]:
        """Return this error as a Kubernetes ``metav1.Status`` dict (kind Status, status Failure)."""
        details: dict[str, Any] = {}
        if self.retry_after_seconds is not None:
            details["retryAfterSeconds"] = self.retry_after_seconds
        if self.causes:
            details["causes"] = self.causes
        status: dict[str, Any] = {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.status,
        }
        if details:
            status["details"] = details
        return status

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class NotFoundError(StorageError):
    """404 NotFound: the key does not exist (storage ErrCodeKeyNotFound)."""

    status = 404
    reason = "NotFound"

    def __init__(self, key: str, resource_version: int = 0) -> None:
        super().__init__(f"key not found: {key}")
        self.key = key
        self.resource_version = resource_version


class AlreadyExistsError(StorageError):
    """409 AlreadyExists: create on a key that exists (storage ErrCodeKeyExists)."""

    status = 409
    reason = "AlreadyExists"

    def __init__(self, key: str) -> None:
        super().__init__(f"key already exists: {key}")
        self.key = key


class ConflictError(StorageError):
    """409 Conflict: an optimistic-concurrency or resource-version conflict."""

    status = 409
    reason = "Conflict"


class PreconditionFailedError(ConflictError):
    """409 Conflict from failed UID / resourceVersion preconditions (storage ErrCodeInvalidObj)."""


class ExpiredError(StorageError):
    """410 Gone, reason Expired: the requested resourceVersion is compacted or older than the history.

    ``continue_token`` is set when a compacted paged list can be resumed (inconsistently) at the latest
    revision, as etcd3's handleCompactedErrorForPaging does.
    """

    status = 410
    reason = "Expired"

    def __init__(self, message: str, *, continue_token: str = "") -> None:
        super().__init__(message)
        self.continue_token = continue_token


class TooLargeResourceVersionError(StorageError):
    """504 Timeout with cause ResourceVersionTooLarge: the storage or cache has not reached the version yet.

    Mirrors storage.NewTooLargeResourceVersionError(minimum, current, retrySeconds).
    """

    status = 504
    reason = "Timeout"

    def __init__(self, minimum: int, current: int, retry_after_seconds: int = 1) -> None:
        super().__init__(f"Too large resource version: {minimum}, current: {current}",
                         retry_after_seconds=retry_after_seconds,
                         causes=[{"reason": "ResourceVersionTooLarge",
                                  "message": "Too large resource version"}])
        self.minimum = minimum
        self.current = current


class TooManyRequestsError(StorageError):
    """429 TooManyRequests with Retry-After (e.g. the watch cache is not ready yet)."""

    status = 429
    reason = "TooManyRequests"

    def __init__(self, message: str, retry_after_seconds: int = 1) -> None:
        super().__init__(message, retry_after_seconds=retry_after_seconds)


class BadRequestError(StorageError):
    """400 BadRequest: malformed selector, continue token or option combination."""

    status = 400
    reason = "BadRequest"


class InvalidError(StorageError):
    """422 Invalid: a malformed value, e.g. a resourceVersion that is not a decimal uint64.

    Mirrors storage.ParseResourceVersion's field error on ``metadata.resourceVersion``.
    """

    status = 422
    reason = "Invalid"

    def __init__(self, message: str, field: str = "") -> None:
        causes = [{"reason": "FieldValueInvalid", "message": message, "field": field}] if field else None
        super().__init__(message, causes=causes)
        self.field = field


class RequestEntityTooLargeError(StorageError):
    """413 RequestEntityTooLarge: the encoded object exceeds the storage request limit (etcd: 1.5 MiB)."""

    status = 413
    reason = "RequestEntityTooLarge"


class TimeoutError_(StorageError):
    """504 Timeout: a storage call did not complete within its deadline."""

    status = 504
    reason = "Timeout"


class ServiceUnavailableError(StorageError):
    """503 ServiceUnavailable: the storage is closed or cannot reach its backend."""

    status = 503
    reason = "ServiceUnavailable"


class StorageClosedError(ServiceUnavailableError):
    """503: a call on a storage (or Cacher) that has been closed."""

    def __init__(self, what: str = "storage") -> None:
        super().__init__(f"{what} is closed")


class InternalError(StorageError):
    """500 InternalError: an unexpected failure (decode error, lost watch stream, ...)."""

    status = 500
    reason = "InternalError"


def error_from_status(status: dict[str, Any]) -> StorageError:
    """Rebuild a typed error from a ``metav1.Status`` dict (the object of an ERROR watch event).

    Unknown codes become InternalError. Used by consumers of watch streams, e.g. the cacher's reflector.
    """
    code = int(status.get("code", 500))
    cls = _BY_CODE.get(code, InternalError)
    err = cls.__new__(cls)
    StorageError.__init__(err, str(status.get("message", "")),
                          retry_after_seconds=(status.get("details") or {}).get("retryAfterSeconds"))
    return err


_BY_CODE: dict[int, type[StorageError]] = {
    400: BadRequestError, 404: NotFoundError, 409: ConflictError, 410: ExpiredError, 413: RequestEntityTooLargeError,
    422: InvalidError, 429: TooManyRequestsError, 503: ServiceUnavailableError, 504: TimeoutError_,
}


def is_expired(err: BaseException) -> bool:
    """True for 410 Gone/Expired errors (client-go reflector's isExpiredError)."""
    return isinstance(err, StorageError) and err.status == 410
