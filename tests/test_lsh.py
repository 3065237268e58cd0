"""LSH-E: hashing, packing and Hamming distance on known answers; eviction order against the reference."""
import pytest
import torch

from cache import LSHCache
from tests import reference_policies as ref
from tests.policy_harness import engine_run, random_stream

H, HKV, D, C, G, R, STEPS = 4, 2, 8, 16, 2, 3, 30


def lsh_cache(lsh_dim, head_dim=4, **kw):
    return LSHCache(1, 1, head_dim, 8, torch.float32, lsh_dim=lsh_dim, **kw)


def test_hash_bits_are_signs_of_the_projection_packed_little_endian():
    cache = lsh_cache(10)
    cache.proj.copy_(torch.eye(4).repeat(1, 3)[:, :10])  # bit i = sign of coordinate i % 4
    x = torch.tensor([1.0, -1.0, 0.0, -2.0])  # signs +,-,+(0 counts as +),- -> bits 1,0,1,0 repeating
    bits = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]
    assert cache.hash(x).tolist() == ref.pack_bits(bits) == [0b01010101, 0b01]


def test_hamming_distance_counts_differing_bits():
    cache = lsh_cache(16)
    a = torch.tensor([[0b00000000, 0b11111111]], dtype=torch.uint8)
    b = torch.tensor([[0b00000111, 0b11111110]], dtype=torch.uint8)
    assert cache.hamming(a, b).tolist() == [4]


@pytest.mark.parametrize("lsh_dim,n_bytes", [(4, 1), (8, 1), (9, 2), (64, 8)])
def test_hash_buffer_is_packed_and_counted_in_memory(lsh_dim, n_bytes):
    c = lsh_cache(lsh_dim)
    assert c.hashes.dtype == torch.uint8 and c.hashes.shape == (1, 1, 8, n_bytes)
    kv = c.store.k.nbytes + c.store.v.nbytes + c.pos.nbytes + c.seen.nbytes
    tables = c.proj.nbytes + c.bit_weights.nbytes + c.popcount.nbytes
    assert c.nbytes() == kv + c.hashes.nbytes + tables


@pytest.mark.parametrize("source", ["key", "query"])
@pytest.mark.parametrize("prompt_len,lsh_dim", [(8, 8), (40, 16), (10, 12)])
def test_eviction_matches_reference(source, prompt_len, lsh_dim):
    q, k, v = random_stream(prompt_len + STEPS, H, HKV, D, seed=prompt_len + lsh_dim)
    cache = LSHCache(1, HKV, D, C, torch.float32, max_seq_length=prompt_len + STEPS, global_tokens=G,
                     recent_window=R, lsh_dim=lsh_dim, lsh_source=source)
    proj = cache.proj.tolist()
    ours, _ = engine_run("lsh", C, G, R, q, k, v, prompt_len, STEPS, cache=cache)
    expected = ref.run(ref.LSHRef(C, G, R, R=proj, lsh_source=source), q, k, v, prompt_len, STEPS)
    assert ours == expected


def test_projection_is_fixed_per_layer_and_differs_between_layers():
    a = LSHCache(1, 1, 8, 8, torch.float32, layer_idx=0)
    b = LSHCache(1, 1, 8, 8, torch.float32, layer_idx=1)
    assert torch.equal(a.proj, LSHCache(1, 1, 8, 8, torch.float32, layer_idx=0).proj)
    assert not torch.equal(a.proj, b.proj)


@pytest.mark.parametrize("bad", [0, 65])
def test_lsh_dim_outside_1_to_64_is_rejected(bad):
    with pytest.raises(ValueError, match="1..64"):
        lsh_cache(bad)
