"""The router alone: which backend each policy picks, and what health and load change."""

from collections import Counter

import pytest

from server.engines.routing import ReplicaLoad, Router

BACKENDS = [f"http://vllm-{i}:8000" for i in range(4)]
KEYS = [f"chat-{i}" for i in range(4000)]


def placement(router: Router, keys=KEYS) -> dict[str, str]:
    return {key: router.pick(key) for key in keys}


# --- affinity -------------------------------------------------------------------------

def test_affinity_is_stable_across_calls_and_routers():
    first = placement(Router(BACKENDS))
    assert placement(Router(BACKENDS)) == first  # another gateway, same choices
    router = Router(BACKENDS)
    assert all(router.pick(key) == backend for key, backend in first.items())


def test_affinity_does_not_depend_on_the_order_backends_are_listed():
    assert placement(Router(BACKENDS)) == placement(Router(list(reversed(BACKENDS))))


def test_affinity_spreads_keys_evenly():
    counts = Counter(placement(Router(BACKENDS)).values())
    assert set(counts) == set(BACKENDS)
    expected = len(KEYS) / len(BACKENDS)
    # a fair multinomial over 4000 keys stays within ~4 sigma (±110) of 1000 per backend
    assert all(abs(count - expected) < 0.12 * expected for count in counts.values()), counts


def test_only_the_keys_of_a_removed_backend_move():
    router = Router(BACKENDS)
    before = placement(router)
    router.mark_down(BACKENDS[2])
    after = placement(router)
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == BACKENDS[2]}
    assert 0.15 < len(moved) / len(KEYS) < 0.35  # about 1/N of them
    assert BACKENDS[2] not in after.values()
    # the removed backend's keys spread over the others rather than all landing on one
    assert len({after[key] for key in moved}) == len(BACKENDS) - 1
    router.mark_up(BACKENDS[2])
    assert placement(router) == before


def test_adding_a_backend_moves_only_keys_to_it():
    before = placement(Router(BACKENDS[:3]))
    after = placement(Router(BACKENDS))
    moved = {key for key in KEYS if before[key] != after[key]}
    assert all(after[key] == BACKENDS[3] for key in moved)
    assert 0.15 < len(moved) / len(KEYS) < 0.35


def test_affinity_spills_to_the_least_loaded_backend_when_much_busier():
    router = Router(BACKENDS, load_slack=2, load_epsilon=0.25)
    home = router.pick("chat-a")
    for _ in range(3):  # 3 > max(0 + 2, 1.25 * 3/4)
        router.started(home)
    spill = router.pick("chat-a")
    assert spill != home
    assert router.in_flight(spill) == 0
    assert router.pick("chat-a") == spill  # the spill is stable while loads stay as they are
    router.finished(home)  # 2 in flight: within the slack again
    assert router.pick("chat-a") == home


def test_affinity_keeps_its_backend_under_even_load():
    router = Router(BACKENDS, load_slack=2, load_epsilon=0.25)
    home = router.pick("chat-a")
    for backend in BACKENDS:  # every backend busy alike: the chat stays home
        for _ in range(10):
            router.started(backend)
    assert router.pick("chat-a") == home
    for _ in range(2):  # 12 against a mean of 10.5: within 1.25 * mean
        router.started(home)
    assert router.pick("chat-a") == home
    for _ in range(2):  # 14 > max(10 + 2, 1.25 * 11)
        router.started(home)
    assert router.pick("chat-a") != home


def test_no_affinity_string_routes_by_load():
    router = Router(BACKENDS, seed=1)
    for backend in BACKENDS[:3]:
        router.started(backend)
    assert router.pick(None) == BACKENDS[3]


# --- health -----------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["affinity", "least-loaded", "round-robin"])
def test_unhealthy_and_excluded_backends_are_skipped(policy):
    router = Router(BACKENDS, policy=policy, seed=0)
    router.mark_down(BACKENDS[0])
    router.mark_down(BACKENDS[1])
    picks = {router.pick(key, exclude=[BACKENDS[2]]) for key in KEYS[:200]}
    assert picks == {BACKENDS[3]}
    assert router.healthy(BACKENDS[2]) and not router.healthy(BACKENDS[0])


@pytest.mark.parametrize("policy", ["affinity", "least-loaded", "round-robin"])
def test_none_when_every_backend_is_down_or_excluded(policy):
    router = Router(BACKENDS, policy=policy)
    for backend in BACKENDS[1:]:
        router.mark_down(backend)
    assert router.pick("chat-a", exclude={BACKENDS[0]}) is None
    router.mark_down(BACKENDS[0])
    assert router.pick("chat-a") is None
    assert router.pick(None) is None
    router.mark_up(BACKENDS[3])
    assert router.pick("chat-a") == BACKENDS[3]


# --- least-loaded and round-robin -------------------------------------------------------

def test_least_loaded_picks_the_backend_with_fewest_in_flight():
    router = Router(BACKENDS, policy="least-loaded", seed=3)
    loads = {BACKENDS[0]: 4, BACKENDS[1]: 1, BACKENDS[2]: 2, BACKENDS[3]: 1}
    for backend, load in loads.items():
        for _ in range(load):
            router.started(backend)
    picks = {router.pick("chat-a") for _ in range(100)}
    assert picks == {BACKENDS[1], BACKENDS[3]}  # ties broken at random, affinity ignored
    router.finished(BACKENDS[0])
    router.finished(BACKENDS[0])
    router.finished(BACKENDS[0])
    router.finished(BACKENDS[0])
    assert router.pick("chat-a") == BACKENDS[0]


def test_least_loaded_ties_are_reproducible_with_a_seed():
    def picks(seed):
        router = Router(BACKENDS, policy="least-loaded", seed=seed)
        return [router.pick(None) for _ in range(50)]
    assert picks(7) == picks(7)
    assert len(set(picks(7))) > 1


def test_round_robin_cycles_over_healthy_backends():
    router = Router(BACKENDS, policy="round-robin")
    first = BACKENDS.index(router.pick("same-chat"))
    assert [router.pick("same-chat") for _ in range(8)] == (BACKENDS * 3)[first + 1:first + 9]
    router.mark_down(BACKENDS[1])
    cycle = [router.pick(None) for _ in range(6)]
    assert cycle[:3] == cycle[3:] and sorted(cycle[:3]) == sorted([BACKENDS[0], BACKENDS[2], BACKENDS[3]])


def test_round_robin_starts_where_its_seed_says_so_that_gateways_do_not_move_in_lockstep():
    starts = {Router(BACKENDS, policy="round-robin", seed=seed).pick(None) for seed in range(20)}
    assert len(starts) > 1
    assert Router(BACKENDS, policy="round-robin", seed=3).pick(None) == Router(BACKENDS, policy="round-robin", seed=3).pick(None)


def test_in_flight_counts_and_their_misuse():
    router = Router(BACKENDS)
    router.started(BACKENDS[0])
    router.started(BACKENDS[0])
    router.finished(BACKENDS[0])
    assert router.in_flight(BACKENDS[0]) == 1
    router.finished(BACKENDS[0])
    with pytest.raises(ValueError):
        router.finished(BACKENDS[0])
    with pytest.raises(KeyError):
        router.mark_down("http://nowhere")


@pytest.mark.parametrize("arguments", [
    {"backends": BACKENDS, "policy": "random"},
    {"backends": []},
    {"backends": [BACKENDS[0], BACKENDS[0]]},
    {"backends": BACKENDS, "load_epsilon": -1},
    {"backends": BACKENDS, "kv_threshold": 0},
    {"backends": BACKENDS, "kv_threshold": 1.5},
])
def test_bad_configurations_are_refused(arguments):
    with pytest.raises(ValueError):
        Router(**arguments)


# --- the load each backend reports ------------------------------------------------------

def loaded(router: Router, **reports: ReplicaLoad) -> Router:
    """`router` with every backend reporting `idle` unless named (b0..b3) in `reports`."""
    for i, backend in enumerate(BACKENDS):
        router.report(backend, reports.get(f"b{i}", ReplicaLoad(waiting=0, running=2, kv_usage=0.1)))
    return router


def home_of(key: str) -> int:
    return BACKENDS.index(Router(BACKENDS).pick(key))


def test_a_reported_load_replaces_the_gateways_own_count_and_requests_sent_since_add_to_it():
    router = Router(BACKENDS)
    router.started(BACKENDS[0])
    assert router.load(BACKENDS[0]) == 1  # no report: this gateway's own request in flight
    router.report(BACKENDS[0], ReplicaLoad(waiting=3, running=5, kv_usage=0.4))
    assert router.load(BACKENDS[0]) == 8  # that request is among the 8 the replica reports
    router.started(BACKENDS[0])
    router.started(BACKENDS[0])
    assert router.load(BACKENDS[0]) == 10  # two sent since the report, which cannot hold them yet
    router.finished(BACKENDS[0])
    assert router.load(BACKENDS[0]) == 10  # taken for the one sent before the report, which it holds
    router.finished(BACKENDS[0])
    assert router.load(BACKENDS[0]) == 9  # one of the two sent since has ended: no longer load
    router.started(BACKENDS[0])
    router.started(BACKENDS[0])
    router.report(BACKENDS[0], ReplicaLoad(waiting=0, running=10, kv_usage=0.4))
    assert router.load(BACKENDS[0]) == 10
    router.report(BACKENDS[0], None)  # no longer known: back to the own count
    assert router.load(BACKENDS[0]) == router.in_flight(BACKENDS[0]) == 3


def test_affinity_yields_when_its_replica_queues_and_returns_when_the_queue_is_gone():
    home = home_of("chat-a")
    router = loaded(Router(BACKENDS), **{f"b{home}": ReplicaLoad(waiting=6, running=8, kv_usage=0.5)})
    spill = router.pick("chat-a")
    assert spill != BACKENDS[home]
    drained = ReplicaLoad(waiting=0, running=2, kv_usage=0.5)
    assert loaded(router, **{f"b{home}": drained}).pick("chat-a") == BACKENDS[home]
    # every replica queueing alike: nowhere is better, the chat stays
    queueing = ReplicaLoad(waiting=6, running=8, kv_usage=0.5)
    assert loaded(router, **{f"b{i}": queueing for i in range(4)}).pick("chat-a") == BACKENDS[home]


def test_a_replica_busy_but_admitting_everything_keeps_its_chats():
    home = home_of("chat-a")
    # far above the others, but nothing waits and its KV cache has room: its cached blocks win
    router = loaded(Router(BACKENDS), **{f"b{home}": ReplicaLoad(waiting=0, running=40, kv_usage=0.85)})
    assert router.pick("chat-a") == BACKENDS[home]
    # the same with its KV cache past the threshold
    loaded(router, **{f"b{home}": ReplicaLoad(waiting=0, running=40, kv_usage=0.95)})
    assert router.pick("chat-a") != BACKENDS[home]


def test_a_burst_sent_between_reports_moves_chats_once_the_replica_queues():
    home = home_of("chat-a")
    router = loaded(Router(BACKENDS), **{f"b{home}": ReplicaLoad(waiting=1, running=3, kv_usage=0.5)})
    assert router.pick("chat-a") == BACKENDS[home]  # 4 against others' 2: within max(2 + 2, 1.25 * 2.5)
    for _ in range(3):  # this gateway's burst since the report: 7 > max(2 + 2, 1.25 * 3.25)
        router.started(BACKENDS[home])
    assert router.pick("chat-a") != BACKENDS[home]


def test_least_loaded_keeps_to_the_gateways_own_count_whatever_the_replicas_report():
    # reports shared by every gateway and up to an interval old would send them all to one replica
    router = loaded(Router(BACKENDS, policy="least-loaded", seed=0), b0=ReplicaLoad(waiting=9, running=9, kv_usage=1))
    for backend in BACKENDS[:3]:
        router.started(backend)
    assert {router.pick(None) for _ in range(20)} == {BACKENDS[3]}
    router.started(BACKENDS[3])
    router.finished(BACKENDS[0])
    assert {router.pick(None) for _ in range(20)} == {BACKENDS[0]}
