"""Admission: bounded FIFO queue, row and prefill-token budgets, waiting for slots without losing a place."""

from dataclasses import dataclass

import pytest

from server.engine.scheduler import QueueFull, Scheduler, Start


@dataclass
class Item:
    request_id: str
    prompt_len: int = 4


def start_all(item):
    return Start.STARTED


def test_full_queue_fails_fast():
    s = Scheduler(max_waiting=2, max_running=4, max_prefill_tokens=100)
    s.submit(Item("a")), s.submit(Item("b"))
    with pytest.raises(QueueFull):
        s.submit(Item("c"))
    assert s.n_waiting == 2
    s.admit(0, start_all)
    s.submit(Item("c"))  # room again once admitted


def test_fifo_under_row_and_token_budgets():
    s = Scheduler(max_waiting=10, max_running=3, max_prefill_tokens=10)
    for name, n in [("a", 6), ("b", 3), ("c", 5), ("d", 1)]:
        s.submit(Item(name, n))
    assert [i.request_id for i in s.admit(0, start_all)] == ["a", "b"]  # "c" would pass 10 tokens: stop
    assert [i.request_id for i in s.admit(2, start_all)] == ["c"]       # one row left
    assert [i.request_id for i in s.admit(0, start_all)] == ["d"]
    big = Item("big", 50)
    s.submit(big)
    assert s.admit(0, start_all) == [big]  # the first request of a step always fits


def test_a_given_budget_holds_for_every_request_in_order():
    s = Scheduler(max_waiting=10, max_running=8, max_prefill_tokens=10)
    for name, n in [("a", 3), ("b", 2), ("c", 4), ("d", 1)]:
        s.submit(Item(name, n))
    assert [i.request_id for i in s.admit(0, start_all, budget=5)] == ["a", "b"]  # "c" would pass 5
    assert s.admit(0, start_all, budget=3) == []                                 # not even the first: "c" waits
    assert [i.request_id for i in s.admit(0, start_all, budget=5)] == ["c", "d"]


def test_waiting_for_a_slot_keeps_the_place_and_lets_hits_pass():
    s = Scheduler(max_waiting=10, max_running=8, max_prefill_tokens=100)
    for name in "abc":
        s.submit(Item(name))
    outcome = {"a": Start.WAIT, "b": Start.STARTED, "c": Start.DROPPED}
    assert [i.request_id for i in s.admit(0, lambda i: outcome[i.request_id])] == ["b"]
    assert s.n_waiting == 1
    assert [i.request_id for i in s.admit(1, start_all)] == ["a"]


def test_remove_takes_a_waiting_request_off():
    s = Scheduler(max_waiting=4, max_running=4, max_prefill_tokens=100)
    s.submit(Item("a")), s.submit(Item("b"))
    assert s.remove("a").request_id == "a"
    assert s.remove("a") is None
    assert [i.request_id for i in s.admit(0, start_all)] == ["b"]
