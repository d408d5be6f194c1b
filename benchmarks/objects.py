"""Pods and node Leases for the simulated cluster, built from real object dumps.

The templates (``data/pod-1.json``, ``data/lease-1.json``; provenance in ``data/SOURCES.md``) ship with
the package and are read through importlib.resources. Every object gets its own name, uid, namespace,
labels and node; the rest of the template (containers, volumes, managedFields, ...) is kept so objects
have the size and shape of real ones.

The cluster layout follows the clusterloader2 "load" test (``WORKLOAD.md``): one load namespace per 100
nodes, a quarter of the pods in big Deployments (250 replicas), a quarter in medium ones (30) and half
in small ones (5); half of the Deployments of each size carry an ``svc`` label (they sit behind a
Service). Pods are labelled ``app=<deployment>``, ``name=<deployment>``, ``group=load``,
``pod-template-hash`` and, where the Deployment has one, ``svc``.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from typing import Any

import orjson

from storage.interface import Resource

#: The pod resource as the benchmark configures it (trigger and index on spec.nodeName, as kube-apiserver).
PODS = Resource("/pods", field_paths=("spec.nodeName", "status.phase"), trigger_field="spec.nodeName",
                index_fields=("spec.nodeName",))
#: Node Leases (namespaced; they live in kube-node-lease).
LEASES = Resource("/leases", field_paths=())
LEASE_NAMESPACE = "kube-node-lease"

#: Nominal replicas by Deployment size class (clusterloader2 BIG/MEDIUM/SMALL_GROUP_SIZE).
GROUP_SIZES = {"big": 250, "medium": 30, "small": 5}
NODES_PER_NAMESPACE = 100


def load_template(name: str) -> bytes:
    """Bytes of a template shipped in ``benchmarks/data`` (e.g. "pod-1.json")."""
    return resources.files("benchmarks").joinpath("data", name).read_bytes()


def now_rfc3339(micro: bool = False) -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Deployment:
    """One simulated Deployment: its pods share ``labels``; ``rs_name``/``rs_uid`` are its ReplicaSet."""

    namespace: str
    name: str
    replicas: int
    labels: dict[str, str]
    rs_name: str
    rs_uid: str


@dataclass
class ClusterLayout:
    """Nodes, namespaces and Deployments of the simulated cluster (see module doc)."""

    nodes: list[str]
    namespaces: list[str]
    deployments: list[Deployment]
    node_uids: dict[str, str] = field(default_factory=dict)
    node_ips: dict[str, str] = field(default_factory=dict)


def _rand_suffix(rng: random.Random, n: int) -> str:
    alphabet = "bcdfghjklmnpqrstvwxz2456789"  # the alphabet of k8s generated names
    return "".join(rng.choice(alphabet) for _ in range(n))


def _uid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def build_layout(nodes: int, pods_per_node: int, rng: random.Random) -> ClusterLayout:
    """The cluster for ``nodes`` nodes and ``pods_per_node`` load pods per node."""
    node_names = [f"bench-node-{i:05d}" for i in range(nodes)]
    n_ns = max(1, -(-nodes // NODES_PER_NAMESPACE))
    namespaces = [f"test-load-{i + 1}" for i in range(n_ns)]
    deployments: list[Deployment] = []
    for ns_i, ns in enumerate(namespaces):
        ns_nodes = min(NODES_PER_NAMESPACE, nodes - ns_i * NODES_PER_NAMESPACE)
        budget = ns_nodes * pods_per_node
        plan: list[tuple[str, int]] = []
        for size, share in (("big", 4), ("medium", 4)):
            plan += [(size, GROUP_SIZES[size])] * (budget // share // GROUP_SIZES[size])
        rest = budget - sum(r for _, r in plan)
        plan += [("small", GROUP_SIZES["small"])] * (rest // GROUP_SIZES["small"])
        if rest % GROUP_SIZES["small"]:
            plan.append(("small", rest % GROUP_SIZES["small"]))
        counters = {s: 0 for s in GROUP_SIZES}
        for size, replicas in plan:
            i = counters[size]
            counters[size] += 1
            name = f"{size}-deployment-{i}"
            pth = "".join(rng.choice("0123456789abcdef") for _ in range(10))
            labels = {"app": name, "name": name, "group": "load", "pod-template-hash": pth}
            if i % 2 == 0:
                labels["svc"] = f"{size}-service-{i // 2}"
            deployments.append(Deployment(ns, name, replicas, labels, f"{name}-{pth}", _uid(rng)))
    layout = ClusterLayout(node_names, namespaces, deployments)
    for i, node in enumerate(node_names):
        layout.node_uids[node] = _uid(rng)
        layout.node_ips[node] = f"10.{64 + i // 65536 % 64}.{i // 256 % 256}.{i % 256}"
    return layout


class ObjectFactory:
    """Makes pods and Leases from the templates. Not thread-safe (one rng)."""

    def __init__(self, layout: ClusterLayout, rng: random.Random) -> None:
        self.layout = layout
        self.rng = rng
        self._pod = orjson.loads(load_template("pod-1.json"))
        self._pod["metadata"].pop("resourceVersion", None)
        self._running_status = self._pod["status"]
        self._lease = orjson.loads(load_template("lease-1.json"))
        self._lease["metadata"].pop("resourceVersion", None)
        self._pod_bytes = orjson.dumps(self._pod)
        self._lease_bytes = orjson.dumps(self._lease)
        self._names: set[tuple[str, str]] = set()
        self._pod_ip = 0

    # ---- pods ------------------------------------------------------------------------------------
    def new_pod(self, dep: Deployment, node: str | None, running: bool) -> dict[str, Any]:
        """A new pod of ``dep``: unscheduled (``node`` None, Pending), bound and Pending, or Running."""
        while True:
            name = f"{dep.rs_name}-{_rand_suffix(self.rng, 5)}"
            if (dep.namespace, name) not in self._names:
                self._names.add((dep.namespace, name))
                break
        pod = orjson.loads(self._pod_bytes)
        meta = pod["metadata"]
        meta["name"] = name
        meta["generateName"] = f"{dep.rs_name}-"
        meta["namespace"] = dep.namespace
        meta["uid"] = _uid(self.rng)
        meta["creationTimestamp"] = now_rfc3339()
        meta["labels"] = dict(dep.labels)
        owner = meta["ownerReferences"][0]
        owner["name"], owner["uid"] = dep.rs_name, dep.rs_uid
        spec = pod["spec"]
        spec["containers"][0]["name"] = dep.name
        if node is None:
            spec.pop("nodeName", None)
        else:
            spec["nodeName"] = node
        if running:
            assert node is not None
            self.set_running(pod, node)
        else:
            pod["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
        return pod

    def bind(self, pod: dict[str, Any], node: str) -> dict[str, Any]:
        """The scheduler's binding: set spec.nodeName and the PodScheduled condition."""
        pod["spec"]["nodeName"] = node
        status = pod.setdefault("status", {})
        status["conditions"] = [{"type": "PodScheduled", "status": "True", "lastProbeTime": None,
                                 "lastTransitionTime": now_rfc3339()}]
        return pod

    def set_running(self, pod: dict[str, Any], node: str) -> dict[str, Any]:
        """The kubelet's status update: phase Running with host and pod IPs, started containers."""
        status = orjson.loads(orjson.dumps(self._running_status))
        self._pod_ip += 1
        ip = f"10.{128 + self._pod_ip // 65536 % 64}.{self._pod_ip // 256 % 256}.{self._pod_ip % 256}"
        now = now_rfc3339()
        status["hostIP"] = self.layout.node_ips[node]
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
        status["startTime"] = now
        for cond in status["conditions"]:
            cond["lastTransitionTime"] = now
        cs = status["containerStatuses"][0]
        cs["name"] = pod["spec"]["containers"][0]["name"]
        cs["state"] = {"running": {"startedAt": now}}
        cs["containerID"] = "containerd://" + "".join(self.rng.choice("0123456789abcdef") for _ in range(64))
        pod["status"] = status
        return pod

    # ---- leases ----------------------------------------------------------------------------------
    def new_lease(self, node: str) -> dict[str, Any]:
        """The node Lease of ``node`` in kube-node-lease."""
        lease = orjson.loads(self._lease_bytes)
        meta = lease["metadata"]
        meta["name"] = node
        meta["namespace"] = LEASE_NAMESPACE
        meta["uid"] = _uid(self.rng)
        meta["creationTimestamp"] = now_rfc3339()
        owner = meta["ownerReferences"][0]
        owner["name"], owner["uid"] = node, self.layout.node_uids[node]
        uid_key = next(k for k in meta["managedFields"][0]["fieldsV1"]["f:metadata"]["f:ownerReferences"]
                       if k.startswith("k:"))
        refs = meta["managedFields"][0]["fieldsV1"]["f:metadata"]["f:ownerReferences"]
        refs['k:{"uid":"%s"}' % owner["uid"]] = refs.pop(uid_key)
        lease["spec"]["holderIdentity"] = node
        lease["spec"]["renewTime"] = now_rfc3339(micro=True)
        return lease


def pod_key(pod: dict[str, Any]) -> str:
    meta = pod["metadata"]
    return f"/pods/{meta['namespace']}/{meta['name']}"


def lease_key(node: str) -> str:
    return f"/leases/{LEASE_NAMESPACE}/{node}"
