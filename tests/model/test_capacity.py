import random

from dsla.model.capacity import grown_capacity, size_class
from dsla.serve.cost import CacheCost


def test_size_classes_hold_the_tokens_waste_under_a_quarter_and_are_fixed_points():
    prev = 0
    for n in range(1, 20000):
        c = size_class(n)
        assert c >= n and size_class(c) == c and c >= prev
        if n > 16:
            assert c < 1.25 * n
        prev = c
    assert [size_class(n) for n in (64, 65, 81, 97, 113, 129)] == [64, 80, 96, 112, 128, 160]


def test_prompts_of_similar_length_share_a_class():
    # 300..319 prompt tokens plus a 256-token reserve: one class, so one SDPA call when they decode
    assert {grown_capacity(64, p + 256) for p in range(300, 320)} == {640}


def test_worst_case_bounds_every_growth_path():
    rng = random.Random(0)
    cost = CacheCost(kv_bytes_per_token=3, fixed_bytes=7, initial_capacity=64)
    for _ in range(300):
        target = rng.randint(1, 30000)
        cap, n = cost.grow(0, rng.randint(1, target)), 0
        while n < target:
            n = min(target, n + rng.randint(1, 500))
            cap = cost.grow(cap, n)
            assert cap >= n
        assert cost.bytes(cap) <= cost.worst_case_bytes(target)
