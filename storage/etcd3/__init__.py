"""The etcd v3 backend: Storage over a real etcd cluster (k8s.io/apiserver pkg/storage/etcd3).

Modules: store (Etcd3Storage), watcher (one gRPC watch stream per watch, in its own thread), lister
(paged reads pinned to one revision), leases (TTL lease reuse), client (channel, worker threads, errors).
"""

from storage.etcd3.store import Etcd3Storage

__all__ = ["Etcd3Storage"]
