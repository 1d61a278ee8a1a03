"""Which vLLM backend serves a request: pure state (health, requests in flight) and policy.

No I/O and no asyncio, so that the gateway (server/engines/replicas.py) and the cluster
simulation (bench/cluster_sim.py) run the very same code.

Chat affinity uses rendezvous (highest random weight) hashing: every backend gets a score
for the chat's affinity string and the highest wins. Scores depend only on the string and the
backend's name, so every gateway picks the same backend for a chat without talking to the
others, and when a backend goes down only the chats it held move (to their second choice).
The load bound is that of consistent hashing with bounded loads: a chat whose backend is much
busier than the rest goes to the least-loaded backend instead, so one heavy chat (or a hash
that happens to favour one backend) cannot pile work onto a single replica.

A backend's load is what it reports itself (vLLM's /metrics: requests waiting and running, KV
cache in use, read by server/engines/replica_load.py) plus the requests this gateway sent it
since that report and still has in flight, which the report cannot hold yet; without a report
(none yet, or too old) it is this gateway's own requests in flight, all it knows. With a report, affinity yields only when
the backend is also under pressure: requests waiting in its queue, or its KV cache fuller than
`kv_threshold`. A busy replica that still admits every request at once serves a chat best where
its blocks are cached; one that queues delays it more than a prefill elsewhere would. The
least-loaded policy keeps to the gateway's own count (see _least_loaded).
"""

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

POLICIES = ("affinity", "least-loaded", "round-robin")
_MASK64 = (1 << 64) - 1


def _hash64(text: str) -> int:
    # hashlib, not hash(): str hashes are salted per process, and every gateway must agree
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _mix64(value: int) -> int:
    """SplitMix64's finalizer: spreads the combination of a key's and a backend's hash over
    all 64 bits, so one key hash per pick (not one per backend) is enough."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK64
    return value ^ (value >> 31)


@dataclass(frozen=True)
class ReplicaLoad:
    """What a backend reported of its own load at one scrape."""

    waiting: float  # requests queued, not yet scheduled
    running: float  # requests being computed
    kv_usage: float  # share of its KV cache blocks in use, 0 to 1


class Router:
    """Health and load of a fixed set of backends, and the choice of one per request.

    `load_slack` and `load_epsilon` bound affinity: the chosen backend is kept while its load
    (see load()) is at most max(least load + load_slack, (1 + load_epsilon) * mean load) over the
    backends that could take the request, or while it reports no pressure (nothing waiting, KV
    cache at most `kv_threshold` full). `seed` makes least-loaded's random tie-breaking
    reproducible.
    """

    def __init__(self, backends: Sequence[str], policy: str = "affinity", load_slack: int = 2,
                 load_epsilon: float = 0.25, kv_threshold: float = 0.9, seed: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"routing policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        if not backends:
            raise ValueError("a router needs at least one backend")
        if len(set(backends)) != len(backends):
            raise ValueError(f"backends must be distinct: {list(backends)}")
        if load_slack < 0 or load_epsilon < 0:
            raise ValueError("load_slack and load_epsilon cannot be negative")
        if not 0 < kv_threshold <= 1:
            raise ValueError(f"kv_threshold is a share of the KV cache, in (0, 1], not {kv_threshold}")
        self.backends = tuple(backends)
        self.policy = policy
        self.load_slack = load_slack
        self.load_epsilon = load_epsilon
        self.kv_threshold = kv_threshold
        self._seeds = {name: _hash64(name) for name in self.backends}
        self._in_flight = dict.fromkeys(self.backends, 0)
        self._healthy = dict.fromkeys(self.backends, True)
        self._reports: dict[str, ReplicaLoad | None] = dict.fromkeys(self.backends)
        self._sent_since_report = dict.fromkeys(self.backends, 0)
        self._random = random.Random(seed)
        # round-robin's position in self.backends, from a random start: gateways that all
        # started at the first backend, fed alike by the load balancer, would step through
        # the list in lockstep and send their requests to the same backend at the same time
        self._next = self._random.randrange(len(self.backends))

    # --- state ----------------------------------------------------------------------

    def started(self, name: str) -> None:
        self._in_flight[name] += 1
        self._sent_since_report[name] += 1

    def report(self, name: str, load: ReplicaLoad | None) -> None:
        """The backend's own account of its load, or None when it is not known (any more)."""
        self._check(name)
        self._reports[name] = load
        self._sent_since_report[name] = 0

    def load(self, name: str) -> float:
        """Requests waiting and running on the backend as it last reported them, plus those this
        gateway sent it since and still has in flight; without a report, this gateway's requests
        in flight there."""
        reported = self._reports[name]
        if reported is None:
            return self._in_flight[name]
        # those sent since that are still in flight, at most: a request that has already ended
        # is not load, and the oldest are the likeliest to have ended
        return reported.waiting + reported.running + min(self._sent_since_report[name], self._in_flight[name])

    def under_pressure(self, name: str) -> bool:
        """Whether the backend says it is queueing or nearly out of KV cache; without a report,
        assumed so, and the load bound alone decides."""
        reported = self._reports[name]
        return reported is None or reported.waiting > 0 or reported.kv_usage > self.kv_threshold

    def finished(self, name: str) -> None:
        if self._in_flight[name] <= 0:
            raise ValueError(f"backend {name!r} has no request in flight")
        self._in_flight[name] -= 1

    def mark_down(self, name: str) -> None:
        self._check(name)
        self._healthy[name] = False

    def mark_up(self, name: str) -> None:
        self._check(name)
        self._healthy[name] = True

    def in_flight(self, name: str) -> int:
        return self._in_flight[name]

    def healthy(self, name: str) -> bool:
        return self._healthy[name]

    def _check(self, name: str) -> None:
        if name not in self._healthy:
            raise KeyError(f"unknown backend {name!r}")

    # --- choice ---------------------------------------------------------------------

    def pick(self, affinity: str | None, exclude: Iterable[str] = ()) -> str | None:
        """The backend for a request, or None when every backend is down or excluded.
        A request without an affinity string is routed by load under the affinity policy."""
        excluded = set(exclude)
        candidates = [name for name in self.backends if self._healthy[name] and name not in excluded]
        if not candidates:
            return None
        if self.policy == "round-robin":
            return self._round_robin(candidates)
        if self.policy == "affinity" and affinity is not None:
            return self._affine(affinity, candidates)
        return self._least_loaded(candidates)

    def _affine(self, affinity: str, candidates: list[str]) -> str:
        key = _hash64(affinity)

        def preference(name: str) -> int:
            return _mix64(key ^ self._seeds[name])

        chosen = max(candidates, key=preference)
        loads = {name: self.load(name) for name in candidates}
        fewest = min(loads.values())
        bound = max(fewest + self.load_slack, (1 + self.load_epsilon) * sum(loads.values()) / len(loads))
        if loads[chosen] <= bound or not self.under_pressure(chosen):
            return chosen
        # the least-loaded backend, ties going to the chat's preference so the spill is stable
        return max((name for name in candidates if loads[name] == fewest), key=preference)

    def _least_loaded(self, candidates: list[str]) -> str:
        # this gateway's own count, not the reports: every gateway sending each request to the
        # replica that looked least loaded at the last report would pile them all onto it for
        # up to a report's age (bench/cluster_sim.py: TTFT p99 1.8 s against 0.44 s, docs/scale.md)
        fewest = min(self._in_flight[name] for name in candidates)
        return self._random.choice([name for name in candidates if self._in_flight[name] == fewest])

    def _round_robin(self, candidates: list[str]) -> str:
        allowed = set(candidates)
        rotated = self.backends[self._next:] + self.backends[:self._next]
        name = next(name for name in rotated if name in allowed)
        self._next = (self.backends.index(name) + 1) % len(self.backends)
        return name
