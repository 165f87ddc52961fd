"""The cache of packed weights (csrc/packed_cache.h): the ops pack a weight list once per weight version.

Hits on repeated calls (forward, backward, in-place step, multi-tensor step), a miss after any in-place
change of a weight, also one through w.data (the CPU confirms hits by the weights' bytes), results
bit-identical with and without the cache, no caching of inference tensors, a bounded LRU, and threads
sharing it. The CUDA binding's rules (graph capture, calls autograd records): test_cuda.py and
test_cuda_emulated.py."""
from __future__ import annotations

import threading

import pytest
import torch

from conftest import (VARIANTS, moments_for, random_grad, random_state, random_weights, requires_native,
                      variant_id)
from l2l_fast import ops

pytestmark = requires_native

H, L, N, P, SCALE = 5, 2, 33, 10.0, 0.1


@pytest.fixture
def cache():
    """l2l_fast._C with an empty cache of the default capacity, restored afterwards."""
    from l2l_fast import _C

    _C.clear_packed_cache()
    capacity = _C.set_packed_cache_capacity(16)
    yield _C
    _C.set_packed_cache_capacity(capacity)
    _C.clear_packed_cache()


def inputs(gen, dtype=torch.float64, features=1):
    weights = random_weights(H, L, gen=gen, dtype=dtype, features=features)
    return random_grad(N, gen=gen, dtype=dtype), random_state(L, H, N, gen=gen, dtype=dtype), weights


def counts(cache):
    stats = cache.packed_cache_stats()
    return stats["hits"], stats["misses"]


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_repeated_calls_hit(gen, cache, variant):
    """Every op, every feature set and output kind: the moments and the output are not part of the packing."""
    features, output = variant
    grad, state, weights = inputs(gen, features=features)
    moments = moments_for(features, grad, gen=gen)

    def fresh():
        return None if moments is None else moments.clone()

    extra = (features, moments, output)
    ops.lstm_step(grad, state, weights, P, SCALE, *extra)
    assert counts(cache) == (0, 1)
    ops.lstm_step(grad, state, weights, P, SCALE, *extra)
    torch.ops.l2l_fast.lstm_step_backward(torch.ones(N, dtype=torch.float64), torch.ones_like(state), grad, state,
                                          weights, P, SCALE, *extra)
    ops.lstm_step_(torch.zeros(N, dtype=torch.float64), grad, state.clone(), weights, P, SCALE, features, fresh(),
                   output)
    ops.lstm_multi_step_([torch.zeros(N, dtype=torch.float64)], [grad], state.clone(), weights, P, SCALE, features,
                         fresh(), output)
    assert counts(cache) == (4, 1)


def test_autograd_backward_hits_the_forwards_entry(gen, cache):
    """The saved weights are the same tensors: one packing per meta-training step, not two."""
    grad, state, weights = inputs(gen)
    weights = [w.requires_grad_(True) for w in weights]
    update, new_state = ops.lstm_step(grad, state, weights, P, SCALE)
    (update.sum() + new_state.sum()).backward()
    assert counts(cache) == (1, 1)


def test_in_place_change_misses_and_changes_the_result(gen, cache):
    grad, state, weights = inputs(gen)
    first, _ = ops.lstm_step(grad, state, weights, P, SCALE)
    with torch.no_grad():
        weights[-2].add_(1)  # out.weight: the update changes for sure
    second, _ = ops.lstm_step(grad, state, weights, P, SCALE)
    assert counts(cache) == (0, 2)
    assert not torch.equal(first, second)
    cache.set_packed_cache_capacity(0)
    assert torch.equal(second, ops.lstm_step(grad, state, weights, P, SCALE)[0])


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
def test_optimizer_step_on_the_weights_misses(gen, cache, foreach):
    """Meta-training: Adam updates the weights in place between truncations; the next call packs the new ones."""
    grad, state, weights = inputs(gen)
    weights = [w.requires_grad_(True) for w in weights]
    adam = torch.optim.Adam(weights, lr=0.1, foreach=foreach)
    for _ in range(2):
        update, _ = ops.lstm_step(grad, state, weights, P, SCALE)
        update.square().sum().backward()
        adam.step()
        adam.zero_grad()
    after = ops.lstm_step(grad, state, weights, P, SCALE)[0]
    assert counts(cache) == (2, 3)  # each backward hits its forward's entry; each forward after a step misses
    fresh = [w.detach().clone() for w in weights]
    assert torch.equal(after, ops.lstm_step(grad, state, fresh, P, SCALE)[0])


def test_writes_through_data_are_seen_on_the_cpu(gen, cache):
    """The hazard of a version-keyed cache: a write through w.data does not bump w's version (gradcheck perturbs
    its inputs that way). On the CPU a hit is confirmed by the weights' bytes, so the write is seen."""
    grad, state, weights = inputs(gen)
    original = weights[-2].clone()
    first, _ = ops.lstm_step(grad, state, weights, P, SCALE)
    weights[-2].data.add_(1)
    second, _ = ops.lstm_step(grad, state, weights, P, SCALE)
    assert not torch.equal(first, second)
    stats = cache.packed_cache_stats()
    assert (stats["hits"], stats["misses"], stats["stale"]) == (0, 2, 1)
    weights[-2].data.copy_(original)  # back to the first values, the same version: the entry of `second` is stale
    assert torch.equal(first, ops.lstm_step(grad, state, weights, P, SCALE)[0])


def test_non_contiguous_weights_are_not_cached_on_the_cpu(gen, cache):
    grad, state, weights = inputs(gen)
    weights[1] = weights[1].t().contiguous().t()
    ops.lstm_step(grad, state, weights, P, SCALE)
    ops.lstm_step(grad, state, weights, P, SCALE)
    stats = cache.packed_cache_stats()
    assert (stats["hits"], stats["misses"], stats["bypassed"]) == (0, 0, 2)


def test_other_tensors_with_equal_values_miss(gen, cache):
    grad, state, weights = inputs(gen)
    ops.lstm_step(grad, state, weights, P, SCALE)
    ops.lstm_step(grad, state, [w.clone() for w in weights], P, SCALE)
    assert counts(cache) == (0, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_results_identical_with_and_without_cache(gen, cache, dtype):
    grad, state, weights = inputs(gen, dtype)
    up_u, up_s = torch.randn(N, generator=gen).to(dtype), torch.randn(state.shape, generator=gen).to(dtype)

    def run():
        forward = ops.lstm_step(grad, state, weights, P, SCALE)
        backward = torch.ops.l2l_fast.lstm_step_backward(up_u, up_s, grad, state, weights, P, SCALE)
        param, st = torch.zeros(N, dtype=dtype), state.clone()
        ops.lstm_step_(param, grad, st, weights, P, SCALE)
        return [*forward, backward[0], backward[1], *backward[2], param, st]

    cache.set_packed_cache_capacity(0)
    uncached = run()
    cache.set_packed_cache_capacity(16)
    run()
    cached = run()
    assert counts(cache)[0] >= 3
    for a, b in zip(cached, uncached, strict=True):
        assert torch.equal(a, b)


def test_inference_tensors_are_not_cached(gen, cache):
    """Inference tensors have no version counter: an in-place change could not be seen."""
    grad, state, weights = inputs(gen)
    with torch.inference_mode():
        weights = [w.clone() for w in weights]
        first, _ = ops.lstm_step(grad, state, weights, P, SCALE)
        weights[-2].add_(1)
        second, _ = ops.lstm_step(grad, state, weights, P, SCALE)
    stats = cache.packed_cache_stats()
    assert (stats["hits"], stats["misses"], stats["bypassed"], stats["entries"]) == (0, 0, 2, 0)
    assert not torch.equal(first, second)


def test_lru_keeps_at_most_capacity_entries(gen, cache):
    cache.set_packed_cache_capacity(3)
    grad, state, weights = inputs(gen)
    sets = [[w.clone() for w in weights] for _ in range(5)]
    for ws in sets:
        ops.lstm_step(grad, state, ws, P, SCALE)
    assert cache.packed_cache_stats()["entries"] == 3
    ops.lstm_step(grad, state, sets[-1], P, SCALE)  # most recent: kept
    ops.lstm_step(grad, state, sets[0], P, SCALE)   # least recent: evicted
    assert counts(cache) == (1, 6)


def test_entries_of_dead_weights_are_dropped(gen, cache):
    grad, state, weights = inputs(gen)
    ops.lstm_step(grad, state, [w.clone() for w in weights], P, SCALE)  # those clones die at once
    ops.lstm_step(grad, state, weights, P, SCALE)
    assert cache.packed_cache_stats()["entries"] == 1


def test_threads_share_the_cache(gen, cache):
    grad, state, weights = inputs(gen)
    expected = ops.lstm_step(grad, state, weights, P, SCALE)[0]
    results, errors = [], []

    def work():
        try:
            for _ in range(20):
                results.append(ops.lstm_step(grad, state, weights, P, SCALE)[0])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 80
    assert all(torch.equal(r, expected) for r in results)
    assert counts(cache) == (80, 1)


def test_capacity_rejects_negative(cache):
    with pytest.raises(ValueError, match="entries"):
        cache.set_packed_cache_capacity(-1)
