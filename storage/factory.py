"""Build a Storage from a configuration: kube-apiserver's storagebackend/factory.

``create_storage(StorageConfig(type="etcd3" | "memory", resource=Resource(...), ...))`` returns a Storage
that is also an async context manager; closing it releases every connection, thread and task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from storage.codec import Codec, JSONCodec
from storage.interface import Resource, Storage
from storage.memory.mvcc import MemoryKV

BACKEND_TYPES = ("etcd3", "memory")


@dataclass
class StorageConfig:
    """Configuration of one resource's storage (storagebackend.Config).

    type: "etcd3" (default, like kube-apiserver) or "memory".
    resource: the Resource this storage serves.
    endpoints: etcd client endpoints, "host:port" strings (etcd3 only).
    prefix: etcd key path prefix, default "/registry" (etcd3 only; --etcd-prefix).
    memory_kv: a MemoryKV to share between resources (memory only; a new one when None).
    codec: object <-> bytes, JSONCodec by default.
    options: backend-specific keyword arguments passed through.
    """

    resource: Resource
    type: str = "etcd3"
    endpoints: list[str] = field(default_factory=lambda: ["127.0.0.1:2379"])
    prefix: str = "/registry"
    memory_kv: MemoryKV | None = None
    codec: Codec = field(default_factory=JSONCodec)
    options: dict[str, Any] = field(default_factory=dict)


def create_storage(config: StorageConfig) -> Storage:
    """Create the Storage described by ``config``.

    Raises ValueError naming the known types for an unknown ``config.type``. The etcd3 backend connects
    lazily; use the result as ``async with create_storage(cfg) as storage:``.
    """
    if config.type == "memory":
        from storage.memory.store import MemoryStorage
        return MemoryStorage(config.resource, config.memory_kv, config.codec, **config.options)
    if config.type == "etcd3":
        from storage.etcd3.store import Etcd3Storage
        return Etcd3Storage(config.resource, endpoints=config.endpoints, path_prefix=config.prefix,
                            codec=config.codec, **config.options)
    raise ValueError(f"unknown storage backend type {config.type!r}; known types: {', '.join(BACKEND_TYPES)}")
