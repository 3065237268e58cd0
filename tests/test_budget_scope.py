"""--budget_scope prompt (kvpress's layout): the prompt is compressed to the budget exactly as under the default scope
(the plain-Python reference's kept positions after prefill), and then every new token is kept: after n decode steps
a head holds its compressed prompt plus the n new positions."""
import pytest
import torch

import policies
from model import ModelArgs, random_model
from policies import POLICIES
from tests import reference_policies as ref
from tests.policy_harness import as_tensor, engine_run, kept_positions, random_stream

H, HKV, D, C, G, R, T, STEPS = 4, 2, 8, 16, 2, 3, 40, 12


def reference(name):
    if name == "random":
        return ref.HashedRandomRef(C, G, R)
    return ref.make_policy(name, C, G, R, observation_window=6)


@pytest.mark.parametrize("name", ["recent_global", "l2", "heavy_hitter", "keydiff", "tova", "random"])
def test_prompt_compressed_as_reference_then_every_new_token_kept(name):
    q, k, v = random_stream(T + STEPS, H, HKV, D, seed=7)
    cache = POLICIES[name](1, HKV, D, C, torch.float32, max_seq_length=T + STEPS, global_tokens=G, recent_window=R,
                           n_heads=H, observation_window=6, decode_room=STEPS)
    ours, _ = engine_run(None, None, None, None, q, k, v, T, STEPS, cache=cache)
    prompt_kept = ref.run(reference(name), q, k, v, T, 0)[0]
    assert ours[0] == prompt_kept
    for n, heads in enumerate(ours):
        assert heads == [sorted(p + list(range(T, T + n))) for p in prompt_kept], f"step {n}"


@pytest.mark.parametrize("keep_set", ["adakv", "chunkkv", "criticalkv"])
def test_keep_sets_compress_the_prompt_as_without_room(keep_set):
    q, k, v = random_stream(T + STEPS, H, HKV, D, seed=3)
    Q, K, V = as_tensor(q), as_tensor(k), as_tensor(v)
    kept = {}
    for room in (0, STEPS):
        c = POLICIES["keydiff"](1, HKV, D, C, torch.float32, max_seq_length=T + STEPS, global_tokens=G,
                                recent_window=R, n_heads=H, keep_set=keep_set, decode_room=room)
        if keep_set == "criticalkv":
            c.set_output_projection(torch.randn(H, D, 24, generator=torch.Generator().manual_seed(0)))
        with torch.no_grad():
            c.prefill(torch.arange(T), K[:, :, :T], V[:, :, :T], Q[:, :, :T])
            kept[room] = kept_positions(c)
            for t in range(T, T + STEPS):
                c.decode(torch.tensor([t]), K[:, :, t:t + 1], V[:, :, t:t + 1], Q[:, :, t:t + 1])
        after = kept_positions(c)
    assert kept[STEPS] == kept[0]
    assert after == [sorted(p + list(range(T, T + STEPS))) for p in kept[0]]


@pytest.fixture(scope="module")
def tiny_model():
    return random_model(ModelArgs(vocab_size=64, n_layer=2, n_head=4, n_local_heads=2, dim=32, intermediate_size=64,
                                  block_size=128), "cpu", torch.float32)


def test_setup_sizes_the_room_from_the_prompt(tiny_model):
    caches = policies.setup(tiny_model, cache_strategy="keydiff", compression_ratio=0.5, budget_scope="prompt",
                            prompt_len=40, max_seq_length=50)
    assert [(c.budget, c.kv_budget) for c in caches] == [(20, 30)] * len(caches)


@pytest.mark.parametrize("options,words", [
    (dict(cache_strategy="lacache"), "own rule"),
    (dict(cache_strategy="keydiff", feed_long_prompts=True), "--feed_long_prompts"),
])
def test_refused_where_it_cannot_hold(tiny_model, options, words):
    with pytest.raises(ValueError, match=words):
        policies.setup(tiny_model, budget_scope="prompt", max_cache_length=0.5, prompt_len=40, max_seq_length=50,
                       **options)
