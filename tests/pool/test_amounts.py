"""The pool's arithmetic (agent/_amounts.py, compiled by setup.py): what a grant and a release do to the books."""

from __future__ import annotations

from agent._amounts import EPS, fits, give_back, take
from agent._types import ResourceType

CPU, MEMORY = ResourceType.CPU, ResourceType.MEMORY


def test_fits_within_what_is_free_less_what_is_set_aside():
    available = {CPU: 2.0, MEMORY: 512}  # a total given as an int stays one
    assert fits({CPU: 2.0, MEMORY: 512.0}, available, None)
    assert fits({CPU: 2.0 + EPS / 2}, available, None)  # rounding slack
    assert not fits({CPU: 2.1}, available, None)
    assert not fits({CPU: 1.0, MEMORY: 513.0}, available, None)
    assert fits({CPU: 1.5}, available, {CPU: 0.5})
    assert not fits({CPU: 1.6}, available, {CPU: 0.5})
    assert fits({MEMORY: 512.0}, available, {CPU: 2.0})  # a reserve of another type does not count
    assert fits({}, available, None)


def test_take_and_give_back_keep_the_books():
    available = {CPU: 4.0, MEMORY: 1024.0}
    lowest = dict(available)
    totals = dict(available)
    area = {CPU: 0.0, MEMORY: 0.0}
    take({CPU: 3.0, MEMORY: 100.0}, available, lowest)
    take({CPU: 0.5}, available, lowest)
    assert available == {CPU: 0.5, MEMORY: 924.0}
    assert lowest == {CPU: 0.5, MEMORY: 924.0}
    give_back({CPU: 3.0, MEMORY: 100.0}, available, totals, area, 2.0)
    assert available == {CPU: 3.5, MEMORY: 1024.0}
    assert area == {CPU: 6.0, MEMORY: 200.0}  # amount x seconds held
    assert lowest == {CPU: 0.5, MEMORY: 924.0}  # the low-water mark stays
    give_back({CPU: 1.0}, available, totals, area, 0.0)  # more than was taken: never past the total
    assert available[CPU] == 4.0
