"""--cache_bits: quantized K/V storage, its error bound, its memory, and fused (copy-free) compiled attention."""
import argparse
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import policies
from cache import KVQuantizer, RecentGlobalCache, fused_attention
from model import attention
from tests.policy_harness import engine_run, random_stream


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [16, 64])
def test_round_trip_error_is_at_most_half_a_step(bits, group):
    qz = KVQuantizer(bits, group, 64)
    x = torch.randn(2, 3, 10, 64) * 3
    codes, scale, zero = qz.quantize(x)
    err = (qz.dequantize(codes, scale, zero) - x).abs().unflatten(-1, (64 // group, group))
    assert codes.dtype == torch.uint8 and codes.shape[-1] == 64 * bits // 8
    assert (err <= scale.unsqueeze(-1) / 2 + 1e-5).all()


def test_four_bit_codes_are_packed_two_per_byte_low_nibble_first():
    qz = KVQuantizer(4, 4, 4)
    codes, _, _ = qz.quantize(torch.tensor([0.0, 15.0, 5.0, 10.0]))  # min 0, scale 1 -> codes 0, 15, 5, 10
    assert codes.tolist() == [0 | 15 << 4, 5 | 10 << 4]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_memory_is_counted_as_stored(bits):
    c = RecentGlobalCache(1, 2, 64, 32, torch.float32, cache_bits=bits)
    full = RecentGlobalCache(1, 2, 64, 32, torch.float32)
    per_slot = 2 * (64 * bits // 8 + 2 * 4)  # k and v: codes + fp32 scale and zero
    bookkeeping = c.pos.nbytes + c.seen.nbytes
    assert c.nbytes() == 2 * 32 * per_slot + bookkeeping
    assert c.nbytes() < full.nbytes() * (bits / 32 + 0.2)


def test_eight_bit_attention_is_close_to_full_precision():
    q, k, v = random_stream(40, 4, 2, 16)
    exact, _ = engine_run("recent_global", 16, 2, 3, q, k, v, 20, 20)
    quant, _ = engine_run("recent_global", 16, 2, 3, q, k, v, 20, 20, cache_bits=8)
    assert exact == quant  # content-independent policy: same slots
    c8 = RecentGlobalCache(1, 2, 16, 24, torch.float32, cache_bits=8)
    kv = torch.randn(1, 2, 24, 16)
    c8.store.write(torch.arange(24).expand(1, 2, 24), kv, kv)
    c8.pos.copy_(torch.arange(24).expand(1, 2, 24))
    qv = torch.randn(1, 4, 1, 16)
    mask = torch.ones(1, 2, 1, 24, dtype=torch.bool)
    y8, _ = c8.attend(qv, c8.keys(), c8.values(), mask)
    y, _ = attention(qv, kv, kv, mask)
    assert (y8 - y).abs().max() < 0.05


def test_compiled_quantized_attention_writes_no_full_precision_copy():
    qz = KVQuantizer(4, 64, 64)
    kc, ks, kz = qz.quantize(torch.randn(1, 2, 256, 64))
    vc, vs, vz = qz.quantize(torch.randn(1, 2, 256, 64))
    q, mask = torch.randn(1, 8, 1, 64), torch.ones(1, 2, 1, 256, dtype=torch.bool)

    def step(q, kc, ks, kz, vc, vs, vz, mask):
        return fused_attention(q, qz.dequantize(kc, ks, kz), qz.dequantize(vc, vs, vz), mask, False)[0]

    out, code = run_and_get_code(torch.compile(step, fullgraph=True), q, kc, ks, kz, vc, vs, vz, mask)
    assert torch.allclose(out, step(q, kc, ks, kz, vc, vs, vz, mask), atol=1e-5)
    sizes = [eval("(" + s + ",)") for s in re.findall(r"empty_strided_\w+\(\(([^)]*)\)", code[0])]
    biggest = max(torch.Size(s).numel() for s in sizes)
    assert biggest < 256 * 64, f"a buffer of {biggest} elements: the dequantized cache was materialized"


def test_bad_cache_bits_is_rejected_with_allowed_values(capsys):
    p = argparse.ArgumentParser()
    policies.add_cache_args(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--cache_bits", "3"])
    assert "must be one of 2, 4, 8, got 3" in capsys.readouterr().err
    with pytest.raises(ValueError, match="2, 4 or 8"):
        KVQuantizer(3, 64, 64)
    with pytest.raises(ValueError, match="must divide head_dim"):
        KVQuantizer(8, 48, 64)
