"""--debug_attention_loss against a plain-Python reference: at each decode step, the attention mass full causal
attention (every position so far) puts on positions the cache no longer holds, mean over query heads, mean over
steps. The kept positions come from the independent references (tests/reference_policies.py)."""
import math

import pytest
import torch

from cache import L2Cache, SinkRecentCache
from tests import reference_policies as ref
from tests.policy_harness import engine_run, random_stream

H, HKV, D = 4, 2, 8


def lost_mass_reference(q, k, kept_per_step, prompt_len):
    """kept_per_step[s][h]: positions KV head h holds after decode step s (position prompt_len + s)."""
    g, steps = H // HKV, []
    for s, kept in enumerate(kept_per_step):
        t, lost = prompt_len + s, []
        for j in range(H):
            h = j // g
            scores = [sum(a * b for a, b in zip(q[t][j], k[p][h])) / math.sqrt(D) for p in range(t + 1)]
            top = max(scores)
            w = [math.exp(x - top) for x in scores]
            lost.append(sum(w[p] for p in range(t + 1) if p not in kept[h]) / sum(w))
        steps.append(sum(lost) / len(lost))
    return sum(steps) / len(steps)


def measured(cache, q, k, v, prompt_len, steps):
    engine_run(None, None, None, None, q, k, v, prompt_len, steps, cache=cache)
    return float(cache.loss_meter.value())


@pytest.mark.parametrize("prompt_len", [6, 30])
def test_sink_recent_attention_loss_equals_reference(prompt_len):
    """sink_recent drops prompt tokens at prefill (keep(T)): the shadow cache must still hold every prompt key."""
    steps, cfg = 20, (2, 5, "uniform", 0, 2, 4)
    hp = dict(zip(["sink_tokens", "recent_tokens", "middle_strategy", "middle_budget_tokens", "uniform_stride",
                   "block_n"], cfg))
    budget = SinkRecentCache.sized_budget(prompt_len, prompt_len + steps, hp)
    q, k, v = random_stream(prompt_len + steps, H, HKV, D, seed=prompt_len)
    c = SinkRecentCache(1, HKV, D, budget, torch.float32, max_seq_length=prompt_len + steps,
                        debug_attention_loss=True, **hp)
    kept = ref.sink_recent_decode(prompt_len, steps, *cfg[:5], block_n=cfg[5])[1:]
    want = lost_mass_reference(q, k, [[set(x)] * HKV for x in kept], prompt_len)
    assert want > 0
    assert measured(c, q, k, v, prompt_len, steps) == pytest.approx(want, rel=1e-5)


def test_l2_attention_loss_equals_reference():
    """A prompt longer than the budget (compressed by l2's default recent_global cut), then norm eviction."""
    prompt_len, steps, C, G, R = 24, 16, 12, 2, 3
    q, k, v = random_stream(prompt_len + steps, H, HKV, D, seed=5)
    c = L2Cache(1, HKV, D, C, torch.float32, max_seq_length=prompt_len + steps, global_tokens=G, recent_window=R,
                debug_attention_loss=True)
    kept = ref.run(ref.make_policy("l2", C, G, R), q, k, v, prompt_len, steps)[1:]
    want = lost_mass_reference(q, k, [[set(h) for h in x] for x in kept], prompt_len)
    assert measured(c, q, k, v, prompt_len, steps) == pytest.approx(want, rel=1e-5)
