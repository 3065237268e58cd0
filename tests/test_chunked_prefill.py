"""--prefill_chunk (block-wise prompt compression: the cache never holds more than its budget) and the kvzip prompt
compressor (scores from a reconstruction of the prompt), against plain-Python references."""
import math

import pytest
import torch

import cache as kvcache
import generate
import policies
from cache import KeyDiffCache, L2Cache
from model import ModelArgs, random_model
from tests import reference_policies as ref
from tests.policy_harness import as_tensor, kept_positions, random_stream

H, HKV, D, C, G, R = 4, 2, 8, 16, 2, 3


def chunked_reference(name, k, T, chunk):
    """Block-wise compression with a keys-only compressor (l2, keydiff): after each chunk the kept tokens and the
    chunk compete; protected (sinks, the recent r of the prompt so far) first, then the highest scores, ties to the
    lower position."""
    kept = [[] for _ in range(HKV)]
    for s in range(0, T, chunk):
        end = min(s + chunk, T)
        for h in range(HKV):
            cands = sorted(set(kept[h]) | set(range(s, end)))
            if len(cands) <= C:
                kept[h] = cands
                continue
            dummy_q = [[[0.0] * D] for _ in cands]  # keys-only compressors: the queries are not read
            scores, _ = ref.prompt_scores(name, dummy_q, [[k[p][h]] for p in cands], 0, 0)
            protected = [p for p in cands if p < G or p >= end - R]
            rest = sorted((p for p in cands if p not in protected), key=lambda p: (-scores[0][cands.index(p)], p))
            kept[h] = sorted(protected + rest[:C - len(protected)])
    return kept


@pytest.mark.parametrize("name,cls", [("l2", L2Cache), ("keydiff", KeyDiffCache)])
@pytest.mark.parametrize("chunk", [5, 12])
def test_chunked_keep_sets_match_the_block_wise_reference(name, cls, chunk):
    T = 50
    q, k, v = random_stream(T, H, HKV, D, seed=chunk)
    Q, K, V = as_tensor(q), as_tensor(k), as_tensor(v)
    c = cls(1, HKV, D, C, torch.float32, max_seq_length=T, global_tokens=G, recent_window=R, n_heads=H)
    with torch.no_grad():
        for s in range(0, T, chunk):
            sl = slice(s, min(s + chunk, T))
            c.prefill(torch.arange(s, sl.stop), K[:, :, sl], V[:, :, sl], Q[:, :, sl])
            assert c.kept() <= HKV * C  # never more than the budget
    assert kept_positions(c) == chunked_reference(name, k, T, chunk)
    assert int(c.seen) == T


def tiny_model(n_layer=2):
    cfg = ModelArgs(vocab_size=128, n_layer=n_layer, n_head=H, n_local_heads=HKV, dim=H * 16,
                    intermediate_size=96, block_size=2048)
    m = random_model(cfg, "cpu", torch.float32, seed=0)
    with torch.no_grad():
        m.output.weight.mul_(20)
    return m


@pytest.mark.parametrize("strategy", ["recent_global", "l2", "keydiff", "tova", "expected_attention", "lsh"])
def test_one_chunk_equals_one_shot(strategy):
    m = tiny_model()
    prompt = torch.randint(0, 128, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    policies.setup(m, cache_strategy=strategy, max_cache_length=32, max_seq_length=90)
    once, _ = generate.generate(m, prompt, 12)
    kept_once = [c.pos.clone() for c in m.caches]
    chunked, _ = generate.generate(m, prompt, 12, prefill_chunk=len(prompt))
    assert chunked == once and all(torch.equal(a, c.pos) for a, c in zip(kept_once, m.caches))


def test_a_prompt_far_longer_than_the_cache():
    """1500 prompt tokens through a 64-slot cache, 100 at a time: every chunk attends to at most 164 keys."""
    m = tiny_model()
    prompt = torch.randint(0, 128, (1500,), generator=torch.Generator().manual_seed(2)).tolist()
    policies.setup(m, cache_strategy="keydiff", max_cache_length=64, max_seq_length=1510)
    tokens, _ = generate.generate(m, prompt, 10, prefill_chunk=100)
    st = kvcache.cache_stats(m)
    assert len(tokens) == 10 and st["seen_tokens"] == 1509 and st["kept_tokens"] == 64
    assert all(c.store.k.shape[2] == 64 for c in m.caches)


@pytest.mark.parametrize("strategy,why", [("heavy_hitter", "needs the whole prompt"), ("lacache", "needs the whole")])
def test_policies_that_need_the_whole_prompt_refuse_chunks(strategy, why):
    m = tiny_model(n_layer=4)
    prompt = list(range(60))
    policies.setup(m, cache_strategy=strategy, max_cache_length=32, max_seq_length=80,
                   **({"span": 2, "start_size": 1} if strategy == "lacache" else {}))
    with pytest.raises(ValueError, match="--prefill_chunk is not supported"):
        generate.generate(m, prompt, 4, prefill_chunk=20)


# ---------------------------------------------------------------------------------------------------------------
# kvzip
# ---------------------------------------------------------------------------------------------------------------
def kvzip_reference(q, k, T, C):
    """Score of prompt key j < T: the largest causal attention it gets from any query at a position >= T (the
    reconstruction), over the query heads of its KV head; keep sinks and the recent r of the prompt, then the
    highest scores (ties to the lower position)."""
    g, kept = H // HKV, []
    for h in range(HKV):
        score = [0.0] * T
        for i in range(T, len(k)):
            for j in range(h * g, (h + 1) * g):
                logits = [ref.dot(q[i][j], k[p][h]) / math.sqrt(D) for p in range(i + 1)]
                probs = ref.softmax(logits)
                score = [max(a, b) for a, b in zip(score, probs[:T])]
        protected = [p for p in range(T) if p < G or p >= T - R]
        rest = sorted((p for p in range(T) if p not in protected), key=lambda p: (-score[p], p))
        kept.append(sorted(protected + rest[:C - len(protected)]))
    return kept


def test_kvzip_keeps_the_prompt_tokens_the_reconstruction_attends_to():
    T, extension = 30, 35
    q, k, v = random_stream(T + extension, H, HKV, D, seed=9)
    c = L2Cache(1, HKV, D, C, torch.float32, max_seq_length=T + extension, global_tokens=G, recent_window=R,
                n_heads=H, prompt_compression_strategy="kvzip")
    with torch.no_grad():
        c.prefill(torch.arange(T + extension), as_tensor(k), as_tensor(v), as_tensor(q), context_len=T)
    assert kept_positions(c) == kvzip_reference(q, k, T, C)
    assert int(c.seen) == T and max(max(h) for h in kept_positions(c)) < T  # the extension is not kept


def test_kvzip_first_token_is_the_full_caches(smol_model, smol_tokenizer):
    """The reconstruction follows the prompt, so (causal attention) the prompt's last logits, and the first new
    token, are those of a plain prefill; the cache then holds only prompt tokens, within its budget."""
    text = "Remember: the code is 7341. " + "The lighthouse keeper counted the waves every night. " * 12
    ids = generate.encode_prompt(smol_tokenizer, text + "What is the code?", True, "chatml")
    policies.setup(smol_model, cache_strategy="full", max_seq_length=len(ids) + 4)
    full = generate.complete(smol_model, smol_tokenizer, ids, max_new_tokens=1)
    policies.setup(smol_model, cache_strategy="l2", prompt_compression_strategy="kvzip", max_cache_length=64,
                   max_seq_length=len(ids) + 4, tokenizer=smol_tokenizer)
    zipped = generate.complete(smol_model, smol_tokenizer, ids, max_new_tokens=1)
    assert zipped["token_ids"][0] == full["token_ids"][0]
    st = zipped["stats"]
    assert st["seen_tokens"] == len(ids) and st["kept_tokens"] == 64
