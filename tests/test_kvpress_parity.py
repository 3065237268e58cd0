"""The engine's prompt compressors against NVIDIA kvpress 0.5.5 (its own press code, tests/kvpress_reference.py) on
the same model weights and the same prompt ids: each press's kept positions per layer and KV head, with the engine's
protections (sinks, window) set to what the press protects. The two sides run different model code (the engine's
SmolLM2 and transformers' Llama), so a position whose score nearly ties with the cut can land on either side: the
test asserts agreement on all but a small share of positions and reports the exact-match rate."""
import pytest
import torch

import policies
from tests.kvpress_reference import kvpress_keep_masks, require_kvpress

RATIO = 0.5  # kvpress's compression_ratio: the fraction of the prompt removed
T = 300  # a multiple of ChunkKV's chunk length


@pytest.fixture(scope="module")
def prompt_ids(smol_tokenizer):
    text = (policies.CONFIG_DIR.parent / "prompts" / "long_story.txt").read_text()
    ids = smol_tokenizer.encode(text)
    assert len(ids) >= T
    return ids[:T]


def engine_masks(model, ids, **options) -> list:
    """Per layer the [Hkv, T] mask of the prompt positions the engine keeps."""
    n_kept = max(1, int(T * (1 - RATIO)))
    policies.setup(model, max_cache_length=n_kept, max_seq_length=T + 1, **options)
    with torch.no_grad():
        model(torch.tensor([ids]), torch.arange(T), prefill=True)
    masks = []
    for c in model.caches:
        m = torch.zeros(c.pos.shape[1], T, dtype=torch.bool)
        for h in range(c.pos.shape[1]):
            kept = c.pos[0, h][c.pos[0, h] >= 0]
            m[h, kept] = True
        masks.append(m)
    return masks


CASES = {  # kvpress press -> engine options with the press's protections
    "knorm": dict(cache_strategy="l2", global_tokens=0, recent_window=0),
    "keydiff": dict(cache_strategy="keydiff", global_tokens=0, recent_window=0),
    "streaming_llm": dict(cache_strategy="recent_global", global_tokens=4, recent_window=0),
    "snapkv": dict(cache_strategy="heavy_hitter", global_tokens=0, observation_window=64, pooling_kernel=5),
    "tova": dict(cache_strategy="tova", global_tokens=0, recent_window=1),
    "expected_attention": dict(cache_strategy="expected_attention", global_tokens=4, recent_window=0),
    "chunkkv(keydiff)": dict(cache_strategy="keydiff", global_tokens=0, recent_window=0, keep_set="chunkkv"),
    "criticalkv(snapkv)": dict(cache_strategy="heavy_hitter", global_tokens=0, observation_window=64,
                               keep_set="criticalkv"),
    "adakv(snapkv)": dict(cache_strategy="heavy_hitter", global_tokens=0, observation_window=64, keep_set="adakv"),
}
MIN_AGREEMENT = 0.99  # share of (layer, head, position) decisions that agree


@pytest.mark.parametrize("press", list(CASES))
def test_prompt_keep_set_matches_kvpress(press, smol_model, hf_smol, prompt_ids, record_property):
    require_kvpress()
    ref = kvpress_keep_masks(hf_smol, prompt_ids, press, RATIO)
    ours = engine_masks(smol_model, prompt_ids, **CASES[press])
    assert len(ref) == len(ours)
    same = sum(int((a == b.bool()).sum()) for a, b in zip(ours, ref))
    total = sum(a.numel() for a in ours)
    exact = sum(bool(torch.equal(a, b.bool())) for a, b in zip(ours, ref)) / len(ours)
    record_property("agreement", same / total)
    record_property("layers_identical", exact)
    print(f"{press}: {same / total:.4%} of decisions agree, {exact:.0%} of layers identical")
    assert [int(a.sum()) for a in ours] == [int(b.sum()) for b in ref]  # the same number kept per layer
    assert same / total >= MIN_AGREEMENT
