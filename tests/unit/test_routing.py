"""Route choice over announced spans (pure: no sockets)."""

from __future__ import annotations

import pytest

from beectl.routing import find_route, uncovered_blocks
from beed.dht.records import ServerRecord, ServerState
from protocol.errors import NoRouteError


def rec(
    peer: str,
    start: int,
    end: int,
    *,
    state: ServerState = ServerState.ONLINE,
    tps: float = 1000.0,
    kv: int = 10_000,
) -> ServerRecord:
    return ServerRecord(
        peer_id=peer,
        state=state,
        span_start=start,
        span_end=end,
        host="127.0.0.1",
        port=1,
        model_fingerprint="fp",
        model_name="m",
        num_blocks=30,
        compute_tokens_per_s=tps,
        free_kv_tokens=kv,
    )


def spans(route):
    return [(h.peer_id, h.start, h.end) for h in route]


def test_two_halves_chain():
    route = find_route([rec("b", 15, 30), rec("a", 0, 15)], 0, 30)
    assert spans(route) == [("a", 0, 15), ("b", 15, 30)]


def test_single_full_server_preferred_over_two_hops():
    servers = [rec("a", 0, 15), rec("b", 15, 30), rec("full", 0, 30)]
    assert spans(find_route(servers, 0, 30)) == [("full", 0, 30)]


def test_overlapping_spans_use_sub_spans():
    route = find_route([rec("a", 0, 20), rec("b", 10, 30)], 0, 30)
    assert route[0].start == 0 and route[-1].end == 30
    assert all(h.start < h.end for h in route)
    assert [h.end for h in route[:-1]] == [h.start for h in route[1:]]


def test_lower_rtt_wins():
    servers = [rec("far", 0, 30), rec("near", 0, 30)]
    route = find_route(servers, 0, 30, rtt_s={"far": 0.2, "near": 0.001})
    assert spans(route) == [("near", 0, 30)]


def test_a_relay_hop_counts_until_the_round_trip_through_it_is_measured():
    import dataclasses

    from beed.net.relay import RelayAddress

    relayed = dataclasses.replace(
        rec("home", 0, 30),
        reachability="unreachable",
        relays=(RelayAddress("r", "127.0.0.1", 2),),
    )
    servers = [relayed, rec("public", 0, 30)]
    assert spans(find_route(servers, 0, 30)) == [("public", 0, 30)]
    # Measured (the Hello's round trip went through the relay), the measurement decides.
    route = find_route(servers, 0, 30, rtt_s={"home": 0.001, "public": 0.02})
    assert spans(route) == [("home", 0, 30)]


def test_banned_and_draining_servers_are_never_used():
    servers = [
        rec("a", 0, 30),
        rec("d", 0, 30, state=ServerState.DRAINING, tps=1e9),
        rec("b", 0, 30, tps=1e9),
    ]
    route = find_route(servers, 0, 30, banned={"b"})
    assert spans(route) == [("a", 0, 30)]


def test_full_server_is_avoided_when_another_fits():
    servers = [rec("full", 0, 30, kv=0, tps=1e9), rec("free", 0, 30, kv=4096)]
    assert spans(find_route(servers, 0, 30, needed_kv_tokens=128)) == [("free", 0, 30)]


def test_gap_raises_no_route_naming_the_block():
    with pytest.raises(NoRouteError, match="block 15"):
        find_route([rec("a", 0, 15), rec("b", 16, 30)], 0, 30)
    assert uncovered_blocks([rec("a", 0, 15), rec("b", 16, 30)], 30) == [15]


def test_partial_range():
    route = find_route([rec("a", 0, 15), rec("b", 15, 30)], 20, 30)
    assert spans(route) == [("b", 20, 30)]


def test_placement_fills_the_model_in_order_then_doubles_it():
    from beed.server.placement import choose_span

    servers: list[ServerRecord] = []
    chosen = []
    for i in range(4):
        span = choose_span(servers, 30, 15)
        chosen.append(span)
        servers.append(rec(f"s{i}", *span))
    assert chosen == [(0, 15), (15, 30), (0, 15), (15, 30)]
    assert choose_span([rec("a", 0, 10)], 30, 50) == (0, 30)
    assert choose_span([rec("a", 0, 12)], 30, 8) == (12, 20)


def test_placement_weighs_throughput():
    from beed.server.placement import choose_span

    # A fast server on 0:15 and a slow one on 15:30: the weak half needs help.
    servers = [rec("fast", 0, 15, tps=3000.0), rec("slow", 15, 30, tps=500.0)]
    assert choose_span(servers, 30, 15, own_tps=1000.0) == (15, 30)


def test_servers_move_only_for_a_clear_gain():
    from beed.server.placement import better_span

    crowd = [rec(f"s{i}", 0, 15) for i in range(4)]
    # Four servers on 0:15 and none on 15:30: one of them moves.
    assert better_span(crowd, 30, (0, 15), self_peer="s0", own_tps=1000.0) == (15, 30)
    # Two and two: nobody moves, nobody "moves" to the span it has.
    balanced = [rec("a", 0, 15), rec("b", 0, 15), rec("c", 15, 30), rec("d", 15, 30)]
    for peer, span in (("a", (0, 15)), ("c", (15, 30))):
        assert better_span(balanced, 30, span, self_peer=peer, own_tps=1000.0) is None
    # Three on 0:15 and two on 15:30: moving would only swap which half is weaker.
    uneven = [*[rec(f"x{i}", 0, 15) for i in range(3)], rec("y0", 15, 30), rec("y1", 15, 30)]
    assert better_span(uneven, 30, (0, 15), self_peer="x0", own_tps=1000.0) is None


def test_throughput_mode_spreads_sessions_over_replicas():
    import collections
    import random

    servers = [rec("a", 0, 30), rec("b", 0, 30), rec("c", 0, 30, tps=100.0)]
    rng = random.Random(5)
    # Latency mode: every session takes the same fastest replica, whatever the load.
    assert {find_route(servers, 0, 30, load={"a": 9})[0].peer_id for _ in range(20)} == {"a"}
    # Throughput mode, no load known (independent clients): the equal replicas split the
    # sessions; the 10x slower one is never worth it.
    picks = collections.Counter(
        find_route(servers, 0, 30, mode="throughput", rng=rng)[0].peer_id for _ in range(200)
    )
    assert picks["a"] > 60 and picks["b"] > 60 and picks["c"] == 0
    # Sessions this client already runs count: a loaded replica gives way to the idle one.
    loaded = {
        find_route(servers, 0, 30, mode="throughput", load={"a": 2}, rng=rng)[0].peer_id
        for _ in range(50)
    }
    assert loaded == {"b"}
    # A client filling replicas one session at a time alternates between them.
    load: dict[str, int] = {}
    for _ in range(10):
        peer = find_route(servers, 0, 30, mode="throughput", load=load, rng=rng)[0].peer_id
        load[peer] = load.get(peer, 0) + 1
    assert set(load) == {"a", "b"} and abs(load["a"] - load["b"]) <= 2
    with pytest.raises(ValueError, match="routing mode"):
        find_route(servers, 0, 30, mode="fastest")


def test_push_costs_the_link_between_servers():
    """Two second halves, equally near the client: with push the one the first server
    announces a short link to wins; relayed, the client's round trips decide."""
    import dataclasses

    first = dataclasses.replace(rec("a", 0, 15), next_rtt_ms=(("b1", 150.0), ("b2", 2.0)))
    servers = [first, rec("b1", 15, 30), rec("b2", 15, 30)]
    rtt = {"a": 0.05, "b1": 0.04, "b2": 0.06}
    assert spans(find_route(servers, 0, 30, rtt_s=rtt, push=True))[1][0] == "b2"
    assert spans(find_route(servers, 0, 30, rtt_s=rtt, push=False))[1][0] == "b1"


def test_push_makes_more_hops_cheap_when_servers_are_close():
    """Relayed, every hop costs the client a round trip, so one slow full server beats three
    fast thirds; pushed through servers close to each other, the thirds win."""
    import dataclasses

    near = (("b", 1.0), ("c", 1.0))
    thirds = [
        dataclasses.replace(rec("a", 0, 10, tps=10_000), next_rtt_ms=near),
        dataclasses.replace(rec("b", 10, 20, tps=10_000), next_rtt_ms=near),
        rec("c", 20, 30, tps=10_000),
    ]
    full = rec("full", 0, 30, tps=400)  # 30 blocks at 400/s: 75 ms of compute
    rtt = {p: 0.1 for p in ("a", "b", "c", "full")}
    relayed = spans(find_route([*thirds, full], 0, 30, rtt_s=rtt))
    pushed = spans(find_route([*thirds, full], 0, 30, rtt_s=rtt, push=True))
    assert relayed == [("full", 0, 30)]
    assert [p for p, _, _ in pushed] == ["a", "b", "c"]
