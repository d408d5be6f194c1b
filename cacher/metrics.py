"""Prometheus metrics of the watch cache, under the names kube-apiserver exports.

Mirrors k8s.io/apiserver pkg/storage/cacher/metrics/metrics.go (and the consistency checker's counter,
pkg/storage/cacher/consistency): every metric carries the labels ``group`` and ``resource``; the
metric families are created once per prometheus_client ``CollectorRegistry`` (the process-wide
``prometheus_client.REGISTRY`` by default) and every Cacher binds its own labelled children through a
``CacherMetrics``, so several Cachers, and tests with private registries, never clash.

Names (prometheus_client appends ``_total`` to counters on exposition; the names below are the exposed
sample names):

==========================================================  ========  =========================================
apiserver_watch_cache_events_received_total                 counter   events applied to the cache
apiserver_watch_cache_events_dispatched_total               counter   events offered to watchers
apiserver_terminated_watchers_total                         counter   watchers ended as too slow
apiserver_watch_cache_resource_version                      gauge     cache RV modulo 10**15
watch_cache_capacity                                        gauge     history capacity (events)
watch_cache_capacity_increase_total / _decrease_total       counter   history resizes
apiserver_watch_cache_initializations_total                 counter   successful (re)lists
apiserver_watch_cache_initialization_errors_total           counter   failed (re)list attempts
apiserver_watch_cache_initialization_duration_seconds       histo     pending -> ready (0.05 s .. 600 s)
apiserver_watch_cache_read_wait_seconds                     histo     waits for freshness (5 ms .. 3 s)
apiserver_watch_cache_consistent_read_total{success,fallback} counter consistent reads from cache
apiserver_cache_list_total{index}                           counter   LISTs served from the cache
apiserver_cache_list_fetched_objects_total{index}           counter   objects visited by those LISTs
apiserver_cache_list_returned_objects_total                 counter   objects returned by those LISTs
apiserver_init_events_total                                 counter   objects loaded by (re)lists
apiserver_storage_consistency_checks_total{status}          counter   consistency checks (success/failure/error)
==========================================================  ========  =========================================
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

#: apiserver_watch_cache_initialization_duration_seconds buckets (seconds, 0.05 .. 600).
INITIALIZATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: apiserver_watch_cache_read_wait_seconds buckets (seconds, 5 ms .. 3 s), as metrics.go WatchCacheReadWait.
READ_WAIT_BUCKETS = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0)
#: The resource version gauge keeps the 15 least significant digits (float64 precision), as Kubernetes.
RESOURCE_VERSION_MODULUS = 10 ** 15

_GR = ("group", "resource")


class _Families:
    """The metric families of one registry (created once per registry, labelled per resource)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, _GR + extra, registry=registry)

        self.events_received = counter("apiserver_watch_cache_events_received_total",
                                       "Counter of events received in watch cache broken by resource type.")
        self.events_dispatched = counter("apiserver_watch_cache_events_dispatched_total",
                                         "Counter of events dispatched in watch cache broken by resource type.")
        self.terminated_watchers = counter("apiserver_terminated_watchers_total",
                                           "Counter of watchers closed due to unresponsiveness broken by "
                                           "resource type.")
        self.resource_version = Gauge("apiserver_watch_cache_resource_version",
                                      "Current resource version of watch cache broken by resource type. "
                                      "This is truncated to the 15 least significant digits.",
                                      _GR, registry=registry)
        self.capacity = Gauge("watch_cache_capacity", "Total capacity of watch cache broken by resource type.",
                              _GR, registry=registry)
        self.capacity_increase = counter("watch_cache_capacity_increase_total",
                                         "Total number of watch cache capacity increase events broken by "
                                         "resource type.")
        self.capacity_decrease = counter("watch_cache_capacity_decrease_total",
                                         "Total number of watch cache capacity decrease events broken by "
                                         "resource type.")
        self.initializations = counter("apiserver_watch_cache_initializations_total",
                                       "Counter of watch cache initializations broken by resource type.")
        self.initialization_errors = counter("apiserver_watch_cache_initialization_errors_total",
                                             "Counter of watch cache initialization errors broken by "
                                             "resource type.")
        self.initialization_duration = Histogram(
            "apiserver_watch_cache_initialization_duration_seconds",
            "Histogram of watch cache initialization duration (pending to ready) in seconds.",
            _GR, buckets=INITIALIZATION_BUCKETS, registry=registry)
        self.read_wait = Histogram("apiserver_watch_cache_read_wait_seconds",
                                   "Histogram of time spent waiting for a watch cache to become fresh.",
                                   _GR, buckets=READ_WAIT_BUCKETS, registry=registry)
        self.consistent_read = counter("apiserver_watch_cache_consistent_read_total",
                                       "Counter for consistent reads from cache.", ("success", "fallback"))
        self.list_total = counter("apiserver_cache_list_total",
                                  "Number of LIST requests served from watch cache", ("index",))
        self.list_fetched = counter("apiserver_cache_list_fetched_objects_total",
                                    "Number of objects read from watch cache in the course of serving a "
                                    "LIST request", ("index",))
        self.list_returned = counter("apiserver_cache_list_returned_objects_total",
                                     "Number of objects returned for a LIST request from watch cache")
        self.init_events = counter("apiserver_init_events_total",
                                   "Counter of init events processed in watch cache broken by resource type.")
        self.consistency_checks = counter("apiserver_storage_consistency_checks_total",
                                          "Counter for status of consistency checks between etcd and watch "
                                          "cache", ("status",))


_lock = threading.Lock()
_by_registry: "weakref.WeakKeyDictionary[CollectorRegistry, _Families]" = weakref.WeakKeyDictionary()


def _families(registry: CollectorRegistry) -> _Families:
    with _lock:
        fam = _by_registry.get(registry)
        if fam is None:
            fam = _by_registry[registry] = _Families(registry)
        return fam


def group_resource(prefix: str) -> tuple[str, str]:
    """(group, resource) for a resource key prefix.

    ``"/pods"`` -> ``("", "pods")``; a two-segment prefix ``"/<group>/<resource>"`` (how kube-apiserver
    lays out most non-core groups in etcd, e.g. ``/apiextensions.k8s.io/customresourcedefinitions``)
    -> ``("<group>", "<resource>")``. Mirrors the schema.GroupResource the Go cacher labels with.
    """
    parts = [p for p in prefix.split("/") if p]
    if not parts:
        return "", ""
    return "/".join(parts[:-1]), parts[-1]


class CacherMetrics:
    """The metrics of one Cacher: children of the registry's families, labelled with its group/resource.

    resource: the resource key prefix ("/pods") or a storage.interface.Resource (its ``prefix``);
    registry: a prometheus_client CollectorRegistry (default: the process-wide ``REGISTRY``);
    group / resource_name: override the labels derived by ``group_resource``.

    All methods are cheap, synchronous and never raise (prometheus_client children are thread-safe).
    Mirrors the Record* helpers of k8s.io/apiserver pkg/storage/cacher/metrics/metrics.go.
    """

    def __init__(self, resource: Any, registry: CollectorRegistry | None = None, *,
                 group: str | None = None, resource_name: str | None = None) -> None:
        prefix = resource if isinstance(resource, str) else resource.prefix
        g, r = group_resource(prefix)
        self.group = g if group is None else group
        self.resource = r if resource_name is None else resource_name
        self.registry = registry if registry is not None else REGISTRY
        fam = self._fam = _families(self.registry)
        labels = (self.group, self.resource)
        self.events_received = fam.events_received.labels(*labels)
        self.events_dispatched = fam.events_dispatched.labels(*labels)
        self.terminated_watchers = fam.terminated_watchers.labels(*labels)
        self.resource_version = fam.resource_version.labels(*labels)
        self.capacity = fam.capacity.labels(*labels)
        self.capacity_increase = fam.capacity_increase.labels(*labels)
        self.capacity_decrease = fam.capacity_decrease.labels(*labels)
        self.initializations = fam.initializations.labels(*labels)
        self.initialization_errors = fam.initialization_errors.labels(*labels)
        self.initialization_duration = fam.initialization_duration.labels(*labels)
        self.read_wait = fam.read_wait.labels(*labels)
        self.list_returned = fam.list_returned.labels(*labels)
        self.init_events = fam.init_events.labels(*labels)

    # ---- recorders -------------------------------------------------------------------------------
    def record_resource_version(self, rv: int) -> None:
        """Set apiserver_watch_cache_resource_version to ``rv`` mod 10**15 (RecordResourceVersion)."""
        self.resource_version.set(rv % RESOURCE_VERSION_MODULUS)

    def record_capacity_change(self, old: int, new: int) -> None:
        """History capacity went from ``old`` to ``new`` events (RecordsWatchCacheCapacityChange)."""
        self.capacity.set(new)
        if new > old:
            self.capacity_increase.inc()
        elif new < old:
            self.capacity_decrease.inc()

    def record_list(self, index: str, fetched: int, returned: int) -> None:
        """A LIST served from the cache via ``index`` ("" = scan) that visited ``fetched`` objects and
        returned ``returned`` (RecordListCacheMetrics)."""
        fam, g, r = self._fam, self.group, self.resource
        fam.list_total.labels(g, r, index).inc()
        fam.list_fetched.labels(g, r, index).inc(fetched)
        self.list_returned.inc(returned)

    def record_consistent_read(self, success: bool, fallback: bool) -> None:
        """A consistent read (resource version "") served from the cache (fallback False) or, after the
        freshness wait timed out, from storage (fallback True); ``success``: it returned a result."""
        self._fam.consistent_read.labels(self.group, self.resource, "true" if success else "false",
                                         "true" if fallback else "false").inc()

    def record_consistency_check(self, status: str) -> None:
        """A consistency check ended with ``status``: "success", "failure" (mismatch) or "error"."""
        self._fam.consistency_checks.labels(self.group, self.resource, status).inc()
