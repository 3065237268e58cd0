"""Drives one layer's engine cache with the same random q/k/v streams the plain-Python references get."""
import random

import torch

from policies import POLICIES


def random_stream(n_pos, n_heads, n_kv, d, seed=0):
    rng = random.Random(seed)
    g = lambda: [rng.gauss(0, 1) for _ in range(d)]  # noqa: E731
    q = [[g() for _ in range(n_heads)] for _ in range(n_pos)]
    k = [[g() for _ in range(n_kv)] for _ in range(n_pos)]
    v = [[g() for _ in range(n_kv)] for _ in range(n_pos)]
    return q, k, v


def as_tensor(x):
    """[N][H][d] lists -> [1, H, N, d] float32 tensor (the engine's layout)."""
    return torch.tensor(x, dtype=torch.float32).permute(1, 0, 2).unsqueeze(0)


def kept_positions(cache):
    return [sorted(p for p in cache.pos[0, h].tolist() if p >= 0) for h in range(cache.pos.shape[1])]


def engine_run(name, C, G, r, q, k, v, prompt_len, n_steps, cache=None, **hp):
    """Kept positions per KV head after prefill and after every decode step (as reference_policies.run)."""
    Q, K, V = as_tensor(q), as_tensor(k), as_tensor(v)
    n_kv, d = K.shape[1], K.shape[3]
    if cache is None:
        cache = POLICIES[name](1, n_kv, d, C, torch.float32, max_seq_length=len(k), global_tokens=G,
                               recent_window=r, **hp)
    out, masks = [], []
    with torch.no_grad():
        cache.prefill(torch.arange(prompt_len), K[:, :, :prompt_len], V[:, :, :prompt_len], Q[:, :, :prompt_len])
        out.append(kept_positions(cache))
        for t in range(prompt_len, prompt_len + n_steps):
            sl = slice(t, t + 1)
            qq, kk, vv, mask = cache.update(torch.tensor([t]), K[:, :, sl], V[:, :, sl], Q[:, :, sl])
            _, probs = cache.attend(qq, kk, vv, mask)
            if probs is not None:
                cache.record_attention(probs)
            out.append(kept_positions(cache))
            masks.append((mask[0, :, 0].clone(), cache.pos[0].clone()))
    return out, masks
