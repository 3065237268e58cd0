"""model.py against transformers' LlamaForCausalLM on SmolLM2 (fp32), and the engine's own invariants."""
import torch

from cache import FullCache
from generate import generate
from sampling import sample

PROMPT = [1, 504, 3458, 282, 4649, 314, 3029, 30, 378, 2, 198, 1, 4093, 198, 5248, 314, 260, 3458, 19]


def full_caches(model, length, batch=1):
    cfg = model.config
    model.setup_caches(length, lambda i: FullCache(batch, cfg.n_local_heads, cfg.head_dim, length, torch.float32))


@torch.no_grad()
def test_prefill_logits_match_transformers(smol_model, hf_smol):
    full_caches(smol_model, 64)
    ids = torch.tensor([PROMPT])
    ours = smol_model(ids, torch.arange(len(PROMPT)), prefill=True)
    ref = hf_smol(ids).logits
    assert (ours - ref).abs().max() < 1e-3


@torch.no_grad()
def test_prefill_last_only_is_the_last_row_of_transformers_logits(smol_model, hf_smol):
    full_caches(smol_model, 64)
    ids = torch.tensor([PROMPT])
    ours = smol_model(ids, torch.arange(len(PROMPT)), prefill=True, last_only=True)
    assert ours.shape == (1, 1, smol_model.config.vocab_size)
    assert (ours[0, 0] - hf_smol(ids).logits[0, -1]).abs().max() < 1e-3
    full_caches(smol_model, 64)  # with a scoring extension after the prompt: the prompt's last position
    ours = smol_model(ids, torch.arange(len(PROMPT)), prefill=True, context_len=7, last_only=True)
    assert (ours[0, 0] - hf_smol(ids[:, :7]).logits[0, -1]).abs().max() < 1e-3


@torch.no_grad()
def test_decode_step_logits_match_transformers(smol_model, hf_smol):
    """Prefill 6 tokens, then feed the rest one at a time through the cache: each step's logits match."""
    full_caches(smol_model, 64)
    ids = torch.tensor([PROMPT])
    ref = hf_smol(ids).logits[0]
    smol_model(ids[:, :6], torch.arange(6), prefill=True)
    for i in range(6, len(PROMPT)):
        step = smol_model(ids[:, i:i + 1], torch.tensor([i]))[0, 0]
        assert (step - ref[i]).abs().max() < 1e-3, i


@torch.no_grad()
def test_greedy_generation_matches_transformers_token_for_token(smol_model, hf_smol, smol_tokenizer):
    prompt = smol_tokenizer.encode_chat([{"role": "user", "content": "Name three colours of the rainbow."}])
    full_caches(smol_model, len(prompt) + 40)
    ours, _ = generate(smol_model, prompt, 40)
    ref = hf_smol.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, min_new_tokens=40)
    assert ours == ref[0, len(prompt):].tolist()
    assert len(ours) == 40


def test_sample_top_k_1_and_tiny_top_p_are_greedy():
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    greedy = sample(logits)
    assert torch.equal(sample(logits, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-6), greedy)


def test_sample_respects_top_k_support():
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    allowed = set(torch.topk(logits, 5).indices[0].tolist())
    draws = {int(sample(logits, temperature=2.0, top_k=5)) for _ in range(200)}
    assert draws <= allowed and len(draws) > 1


def test_sample_frequencies_follow_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    draws = torch.cat([sample(logits, temperature=1.0) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert (freq - logits.softmax(-1)[0]).abs().max() < 0.03
