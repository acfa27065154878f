"""The migration triggers as pure logic: imbalance with hysteresis, memory pressure, cooldowns,
and draining instances left alone."""

from __future__ import annotations

from pdserve.router.migration import Load, MigrationPolicy, Move


def L(i, used, running, total=100, draining=False):
    return Load(i, total - used, total, running, draining)


def test_balanced_pool_does_nothing():
    p = MigrationPolicy()
    assert p.decide([L("a", 40, 5), L("b", 35, 4)], 0.0) == []


def test_imbalance_moves_from_most_to_least_loaded_with_hysteresis():
    p = MigrationPolicy(imbalance_high=0.3, imbalance_low=0.1, cooldown_s=0)
    assert p.decide([L("a", 70, 6), L("b", 20, 2)], 0.0) == [Move("a", "b", "imbalance")]
    # gap 0.2: between low and high — the run goes on (it would not start at 0.2)
    assert p.decide([L("a", 60, 5), L("b", 40, 3)], 1.0) == [Move("a", "b", "imbalance")]
    # gap below low: the run ends ...
    assert p.decide([L("a", 52, 4), L("b", 45, 4)], 2.0) == []
    # ... and a gap of 0.2 does not start a new one
    assert MigrationPolicy().decide([L("a", 60, 5), L("b", 40, 4)], 0.0) == []
    assert p.decide([L("a", 60, 5), L("b", 40, 4)], 3.0) == []


def test_batch_gap_alone_triggers():
    p = MigrationPolicy(batch_gap=8, cooldown_s=0)
    assert p.decide([L("a", 30, 12), L("b", 25, 2)], 0.0) == [Move("a", "b", "imbalance")]


def test_single_request_source_is_not_moved_for_imbalance():
    p = MigrationPolicy(min_running=2)
    assert p.decide([L("a", 80, 1), L("b", 0, 0)], 0.0) == []


def test_memory_pressure_prefers_the_roomiest_peer():
    p = MigrationPolicy(pressure_free=0.1, cooldown_s=0)
    moves = p.decide([L("a", 95, 3), L("b", 50, 3), L("c", 20, 1)], 0.0)
    assert moves[0] == Move("a", "c", "memory_pressure")
    assert all(m.src != "a" or m.reason == "memory_pressure" for m in moves)


def test_no_room_anywhere_means_no_pressure_move():
    p = MigrationPolicy(pressure_free=0.1)
    assert [m for m in p.decide([L("a", 95, 3), L("b", 90, 3)], 0.0)
            if m.reason == "memory_pressure"] == []


def test_cooldown_spaces_moves_from_one_source():
    p = MigrationPolicy(cooldown_s=2.0)
    loads = [L("a", 80, 8), L("b", 10, 1)]
    assert p.decide(loads, 0.0) == [Move("a", "b", "imbalance")]
    assert p.decide(loads, 1.0) == []
    assert p.decide(loads, 2.5) == [Move("a", "b", "imbalance")]


def test_draining_instances_are_neither_source_nor_destination():
    p = MigrationPolicy(cooldown_s=0)
    assert p.decide([L("a", 80, 8), L("b", 0, 0, draining=True)], 0.0) == []
    assert p.decide([L("a", 80, 8, draining=True), L("b", 0, 0), L("c", 10, 1)], 0.0) == []
