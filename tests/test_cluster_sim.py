"""bench/cluster_sim.py: the simulation behind docs/scale.md behaves as its results claim."""

import importlib.util
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("cluster_sim", Path(__file__).parents[1] / "bench" / "cluster_sim.py")
cluster_sim = sys.modules["cluster_sim"] = importlib.util.module_from_spec(_SPEC)  # dataclasses look it up
_SPEC.loader.exec_module(cluster_sim)

SMALL = ["--replicas", "8", "--duration", "20", "--warmup", "10"]


def run(*flags: str, policy: str = "affinity"):
    """The finished simulation and its report, for one policy on 8 replicas."""
    args = cluster_sim.parse_args([*SMALL, "--policy", policy, *flags])
    [(policy, replicas, config)] = cluster_sim.configurations(args)
    simulation = cluster_sim.Simulation(config, policy, replicas)
    return simulation, simulation.run()


def test_same_seed_same_results_other_seed_other_results():
    _, first = run("--seed", "5")
    _, again = run("--seed", "5")
    _, other = run("--seed", "6")
    assert first == again
    assert other != first


def test_every_request_is_answered_without_a_failure():
    simulation, report = run("--fail-at", "none")
    assert report["requests"] > 500
    assert all(r.status == "ok" for r in simulation.requests)
    assert all(r.sent < r.first_token <= r.done for r in simulation.requests)
    # the chats' turns all happened, in order, up to the end of the run
    for chat in {r.chat for r in simulation.requests}:
        turns = [r.turn for r in simulation.requests if r.chat is chat]
        assert turns == list(range(turns[0], turns[0] + len(turns)))


@pytest.mark.parametrize("rival", ["round-robin", "least-loaded"])
def test_affinity_hits_the_prefix_cache_far_more_than_load_routing(rival):
    _, affine = run("--fail-at", "none")
    _, spread = run("--fail-at", "none", policy=rival)
    assert affine["windows"]["steady"]["follow_up_hit_rate"] > 2 * spread["windows"]["steady"]["follow_up_hit_rate"]
    assert affine["windows"]["steady"]["follow_up_moved"] < spread["windows"]["steady"]["follow_up_moved"] / 2


def test_the_replicas_reported_load_moves_fewer_follow_ups_than_each_gateways_own_count():
    # three gateways: each sees a third of a replica's load, a noisy count that moves chats for nothing
    simulation, reported = run("--fail-at", "none", "--load-signal", "reported")
    _, own = run("--fail-at", "none", "--load-signal", "own")
    assert all(r.status == "ok" for r in simulation.requests)
    steady, before = reported["windows"]["steady"], own["windows"]["steady"]
    assert steady["follow_up_moved"] < before["follow_up_moved"] / 4, (steady, before)
    assert steady["follow_up_hit_rate"] > before["follow_up_hit_rate"]


@pytest.mark.parametrize("policy", cluster_sim.POLICIES)
def test_a_failed_replica_serves_nothing_after_failing(policy):
    # many gateways and slow probes: some learn of the failure only when it refuses a request
    simulation, report = run("--fail-at", "5", "--fail-replica", "vllm-3", "--gateways", "32",
                             "--probe-interval", "10", policy=policy)
    failed_at = simulation.args.fail_at
    assert report["failed_replica"] == "vllm-3"
    assert report["displaced_chats"] > 0
    assert report["sent_to_failed_after_failing"] > 0
    assert all(r.done is not None for r in simulation.requests)
    for request in simulation.requests:
        if request.served_by == "vllm-3":
            assert request.first_token < failed_at
        for when, name in request.attempts:
            if name == "vllm-3" and when >= failed_at:
                # refused: retried on another replica, and only until the gateway's probe
                assert when <= failed_at + simulation.args.probe_interval
                assert request.attempts[-1][1] != "vllm-3"
    # streams the failure cut were sent again by their users and answered
    for cut in (r for r in simulation.requests if r.status == "stream-error"):
        assert any(r.chat is cut.chat and r.turn == cut.turn and r.status == "ok" for r in simulation.requests)
