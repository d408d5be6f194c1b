"""Correctness check: every watcher got every event meant for it, once, in order.

The writer keeps a log of every write it made: revision, key, operation, the object's labels and its
(node, phase) before and after. For a watcher with a selector, the expected stream after the revision
it started from follows the Kubernetes rule (etcd3 watcher / cacheWatcher): a change that makes the
object match is ADDED, one that keeps it matching is MODIFIED, one that makes it stop matching or
deletes a matching object is DELETED; changes of objects that match neither before nor after are not
sent. The matching is evaluated here by plain Python predicates written independently of the
project's selector code, so a selector bug cannot hide itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"
CREATE, UPDATE, DELETE = "create", "update", "delete"

#: (node, phase) of a pod; None when the object does not exist.
PodState = tuple[str, str] | None
#: Does an object with these labels and state match the watcher's selector?
Predicate = Callable[[Mapping[str, str], tuple[str, str]], bool]


@dataclass(slots=True)
class LogEntry:
    """One acknowledged write."""

    rv: int
    key: str
    op: str  # create / update / delete
    labels: Mapping[str, str]
    before: PodState
    after: PodState
    t_ack: float
    t_issue: float = 0.0


def expected_events(log: list[LogEntry], key_prefix: str, predicate: Predicate,
                    start_rv: int) -> list[tuple[str, int, str]]:
    """(key, rv, type) the watcher must receive, in revision order, for writes after ``start_rv``."""
    out: list[tuple[str, int, str]] = []
    for e in log:
        if e.rv <= start_rv or not e.key.startswith(key_prefix):
            continue
        prev_ok = e.before is not None and predicate(e.labels, e.before)
        if e.op == DELETE:
            if prev_ok:
                out.append((e.key, e.rv, DELETED))
            continue
        cur_ok = e.after is not None and predicate(e.labels, e.after)
        if cur_ok:
            out.append((e.key, e.rv, MODIFIED if prev_ok else ADDED))
        elif prev_ok:
            out.append((e.key, e.rv, DELETED))
    return out


def compare_stream(expected: list[tuple[str, int, str]], received: list[tuple[str, int, str]],
                   max_examples: int = 3) -> dict[str, Any]:
    """Compare a watcher's received (key, rv, type) sequence with the expected one.

    Returns ``{"ok", "expected", "received", "missing", "unexpected", "duplicates", "out_of_order",
    "first_mismatch"}``; ``first_mismatch`` is None or {index, expected, received}.
    """
    result: dict[str, Any] = {"ok": expected == received, "expected": len(expected), "received": len(received),
                              "missing": 0, "unexpected": 0, "duplicates": 0, "out_of_order": 0,
                              "first_mismatch": None}
    if result["ok"]:
        return result
    exp_set = set(expected)
    seen: set[tuple[str, int, str]] = set()
    last_rv = -1
    examples: dict[str, list] = {"missing": [], "unexpected": [], "duplicates": []}
    for item in received:
        if item in seen:
            result["duplicates"] += 1
            if len(examples["duplicates"]) < max_examples:
                examples["duplicates"].append(list(item))
        seen.add(item)
        if item not in exp_set:
            result["unexpected"] += 1
            if len(examples["unexpected"]) < max_examples:
                examples["unexpected"].append(list(item))
        if item[1] < last_rv:
            result["out_of_order"] += 1
        last_rv = max(last_rv, item[1])
    for item in expected:
        if item not in seen:
            result["missing"] += 1
            if len(examples["missing"]) < max_examples:
                examples["missing"].append(list(item))
    for i in range(max(len(expected), len(received))):
        e = expected[i] if i < len(expected) else None
        r = received[i] if i < len(received) else None
        if e != r:
            result["first_mismatch"] = {"index": i, "expected": list(e) if e else None,
                                        "received": list(r) if r else None}
            break
    result["examples"] = examples
    return result


def is_prefix_in_order(expected: list[tuple[str, int, str]], received: list[tuple[str, int, str]]) -> bool:
    """True if ``received`` is exactly the first len(received) expected events (a watch that was ended
    early but got nothing wrong before it ended)."""
    return received == expected[:len(received)]
