"""Admission gates: capacity, a bounded FIFO queue, timeouts, cancellation, and tickets that
release exactly once (pure asyncio logic, no Ray)."""

from __future__ import annotations

import asyncio

import pytest
from pdserve.router.admission import Admission, AdmissionConfig, Gate
from pdserve.router.errors import Overloaded


async def test_gate_admits_capacity_then_queues_then_rejects():
    g = Gate("decode", capacity=2, max_queue=1)
    await g.acquire(1.0, 1)
    await g.acquire(1.0, 1)
    waiter = asyncio.create_task(g.acquire(5.0, 1))
    await asyncio.sleep(0)
    assert g.waiting == 1 and not waiter.done()
    with pytest.raises(Overloaded) as e:
        await g.acquire(5.0, 3)
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "3"}
    assert "queue holds 1" in e.value.message and g.rejected == 1
    g.release()  # the slot goes straight to the waiter
    await asyncio.wait_for(waiter, 1.0)
    assert g.in_use == 2 and g.waiting == 0 and g.peak_waiting == 1
    g.release()
    g.release()
    assert g.in_use == 0


async def test_gate_is_fifo():
    g = Gate("prefill", capacity=1, max_queue=5)
    await g.acquire(1.0, 1)
    order: list[int] = []

    async def wait(i: int) -> None:
        await g.acquire(5.0, 1)
        order.append(i)

    tasks = [asyncio.create_task(wait(i)) for i in range(4)]
    await asyncio.sleep(0)
    for _ in range(4):
        g.release()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]


async def test_queue_timeout_is_overloaded_and_leaves_no_waiter():
    g = Gate("decode", capacity=1, max_queue=2)
    await g.acquire(1.0, 1)
    with pytest.raises(Overloaded) as e:
        await g.acquire(0.05, 1)
    assert "stayed busy for 0.05 s" in e.value.message
    assert g.waiting == 0 and g.in_use == 1
    g.release()
    assert g.in_use == 0


async def test_cancelled_waiter_gives_up_its_place_and_never_a_slot():
    g = Gate("decode", capacity=1, max_queue=2)
    await g.acquire(1.0, 1)
    t = asyncio.create_task(g.acquire(5.0, 1))
    await asyncio.sleep(0)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert g.waiting == 0
    g.release()
    assert g.in_use == 0  # nobody holds a slot: no leak


async def test_slot_handed_to_a_waiter_that_is_cancelled_is_passed_on():
    g = Gate("decode", capacity=1, max_queue=3)
    await g.acquire(1.0, 1)
    first = asyncio.create_task(g.acquire(5.0, 1))
    second = asyncio.create_task(g.acquire(5.0, 1))
    await asyncio.sleep(0)
    g.release()  # handed to `first`...
    first.cancel()  # ...which gives up before it runs: the slot must reach `second`
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1.0)
    assert g.in_use == 1 and g.waiting == 0


def _admission(max_queue: int = 1) -> Admission:
    return Admission({"decode": 1, "prefill": 1}, AdmissionConfig(max_queue, 5.0, 1))


async def test_ticket_holds_every_pool_and_releases_each_once():
    adm = _admission()
    t = await adm.admit()
    assert t.held == ("decode", "prefill")
    t.release("prefill")
    t.release("prefill")  # idempotent
    assert adm.gates["prefill"].in_use == 0 and adm.gates["decode"].in_use == 1
    t.close()
    t.close()
    assert all(g.in_use == 0 for g in adm.gates.values())


async def test_prefill_released_at_first_token_lets_the_next_request_prefill():
    """Decode capacity 2, prefill capacity 1: the second request waits only for the first's
    prompt, not for its whole generation."""
    adm = Admission({"decode": 2, "prefill": 1}, AdmissionConfig(2, 5.0, 1))
    a = await adm.admit()
    b = asyncio.create_task(adm.admit())
    await asyncio.sleep(0.01)
    assert not b.done()  # waiting for prefill
    a.release("prefill")
    tb = await asyncio.wait_for(b, 1.0)
    assert adm.gates["decode"].in_use == 2 and adm.gates["prefill"].in_use == 1
    a.close()
    tb.close()


async def test_failed_admission_holds_nothing():
    adm = Admission({"decode": 2, "prefill": 1}, AdmissionConfig(0, 5.0, 1))
    t = await adm.admit()
    with pytest.raises(Overloaded):
        await adm.admit()  # decode has room, prefill's queue (0) is full
    assert adm.gates["decode"].in_use == 1  # the decode slot it took was given back
    t.close()


async def test_overload_memory_is_bounded_by_capacity_plus_queue():
    adm = _admission(max_queue=3)
    results = await asyncio.gather(*(adm.admit(timeout_s=0.2) for _ in range(50)),
                                   return_exceptions=True)
    admitted = [r for r in results if not isinstance(r, BaseException)]
    assert len(admitted) == 1  # nobody released, so queued ones time out
    assert all(isinstance(r, Overloaded) for r in results if isinstance(r, BaseException))
    assert adm.gates["decode"].peak_waiting == 3  # never more than max_queue waited
    admitted[0].close()
    assert all(g.in_use == 0 and g.waiting == 0 for g in adm.gates.values())


def test_for_app_sizes_gates_from_the_pools():
    cfg = {"mode": "disaggregated", "router": {"max_queue": 7, "queue_timeout_s": 2.0,
                                               "retry_after_s": 3},
           "prefill": {"replicas": 2, "max_num_seqs": 4}, "decode": {"replicas": 3,
                                                                     "max_num_seqs": 5}}
    adm = Admission.for_app(cfg)
    assert list(adm.gates) == ["decode", "prefill"]  # acquisition order
    assert adm.gates["decode"].capacity == 15 and adm.gates["prefill"].capacity == 8
    assert adm.gates["decode"].max_queue == 7 and adm.cfg.retry_after_s == 3
    colo = Admission.for_app({**cfg, "mode": "colocated",
                              "colocated": {"replicas": 1, "max_num_seqs": 9}})
    assert {k: g.capacity for k, g in colo.gates.items()} == {"colocated": 9}
