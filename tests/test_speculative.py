"""Speculative decoding (speculative.py; generate.py --draft_checkpoint_path / --speculate_k).

Exactness is checked against generate.generate on the same model: the same tokens and, in the target's caches, the
same kept positions (and every other integer buffer) as plain decoding, with eviction happening. A draft equal to
the target must be accepted every time; a random draft almost never, and must not change the output. The sampling
step is checked on hand-made distributions (Monte Carlo), end to end through top_k=1 (sampling that must equal
greedy) and with a seed. One compiled run on a tiny model equals eager without recompiling after warm_up.
"""
import argparse
import subprocess
import sys

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import generate
import policies
import runtime
import sampling
import speculative
from model import ModelArgs, Transformer, random_model
from tests.test_compile import cache_args
from tests.test_generate_cli import REPO, SHORT, cli_json, memoised_smol  # noqa: F401 (autouse fixture)

PROMPT = "Explain in two sentences why the sky is blue and why sunsets are red."
N_NEW = 14


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Verification forwards are small multi-row matmuls: with 2 OpenMP threads on a machine whose cores are busy
    with other work they stall at barriers (x40 measured on a 5 x 576 x 1536 matmul); one thread keeps this module
    fast everywhere. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def setup_caches(model, flags: list, prompt_len: int, max_seq_length: int):
    p = argparse.ArgumentParser()
    policies.add_cache_args(p)
    policies.setup(model, policies.parse_args(p, flags), batch_size=1, prompt_len=prompt_len,
                  max_seq_length=max_seq_length)


def twin(model) -> Transformer:
    """A second instance sharing the weights (each model needs its own caches)."""
    with torch.device("meta"):
        t = Transformer(model.config)
    t.load_state_dict(model.state_dict(), assign=True)
    return t.eval()


def tiny_draft(vocab_size: int, seed: int = 0) -> Transformer:
    cfg = ModelArgs(vocab_size=vocab_size, n_layer=1, n_head=2, n_local_heads=1, dim=32, intermediate_size=64,
                    tie_word_embeddings=True, block_size=8192)
    return random_model(cfg, "cpu", torch.float32, seed=seed)


def kept(cache) -> int:
    """Tokens held by the fullest KV head."""
    return int((cache.pos >= 0).sum(-1).max())


def cache_state(model) -> list:
    return [{name: buf.clone() for name, buf in c.named_buffers()} for c in model.caches]


def assert_same_cache_state(ref: list, model, what: str):
    """Every integer / boolean buffer (positions, counters, hashes, ranks, flags) equal; float buffers (K/V,
    scores) equal up to the rounding of a multi-token forward."""
    for layer, (want, c) in enumerate(zip(ref, model.caches)):
        for name, buf in c.named_buffers():
            if buf.is_floating_point():
                torch.testing.assert_close(buf, want[name], rtol=1e-3, atol=1e-4,
                                           msg=lambda m: f"{what}: layer {layer} {name}: {m}")
            else:
                assert torch.equal(buf, want[name]), f"{what}: layer {layer} {type(c).__name__}.{name} differs"


def plain_and_speculative(target, draft, prompt, n_new, k, flags, **kw):
    """(plain tokens, speculative tokens, speculative stats); asserts equal target cache states at the end."""
    setup_caches(target, flags, len(prompt), len(prompt) + n_new)
    setup_caches(draft, flags, len(prompt), len(prompt) + n_new)
    plain, _ = generate.generate(target, prompt, n_new, **kw)
    ref = cache_state(target)
    spec, stats = speculative.speculative_generate(target, draft, prompt, n_new, k, **kw)
    assert_same_cache_state(ref, target, " ".join(flags))
    return plain, spec, stats


# Budgets below the prompt length (~50 tokens): the prompt is compressed and every decode step evicts.
COMPRESSED = {
    "recent_global": ["--cache_strategy", "recent_global", "--max_cache_length", "24"],
    "heavy_hitter": ["--cache_strategy", "heavy_hitter", "--max_cache_length", "24", "--observation_window", "4"],
    "lsh": ["--cache_strategy", "lsh", "--lsh_dim", "8", "--max_cache_length", "24"],
}
CONFIGS = {"full": ["--cache_strategy", "full"], **COMPRESSED}


@pytest.fixture(scope="module")
def smol(smol_model, smol_tokenizer):
    prompt = smol_tokenizer.encode_chat([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    assert len(prompt) > 24
    return smol_model, twin(smol_model), prompt


# ---------------------------------------------------------------------------------------------------------------
# (a) SmolLM2 drafting for itself: everything accepted, the plain tokens and cache states
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", list(CONFIGS))
def test_self_draft_is_always_accepted_and_exact(smol, config):
    target, draft, prompt = smol
    plain, spec, stats = plain_and_speculative(target, draft, prompt, N_NEW, 4, CONFIGS[config])
    st = stats["speculative"]
    assert spec == plain
    assert st["acceptance_rate"] == 1.0 and st["accepted"] == st["drafted"] > 0
    assert st["target_replays"] == 0
    assert st["tokens_per_round"] == 5.0  # 4 drafts + the bonus token per target forward
    if config != "full":
        assert all(kept(c) < len(prompt) + N_NEW - 1 for c in target.caches), "the cache must evict"


# ---------------------------------------------------------------------------------------------------------------
# (b) a random draft: (almost) nothing accepted, the output unchanged, every rejection undone exactly
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["full", "recent_global"])
def test_random_draft_leaves_the_output_unchanged(smol, config):
    target, _, prompt = smol
    draft = tiny_draft(target.config.vocab_size)
    plain, spec, stats = plain_and_speculative(target, draft, prompt, 10, 3, CONFIGS[config])
    st = stats["speculative"]
    assert spec == plain
    assert st["acceptance_rate"] < 0.2 and st["target_replays"] > 0
    assert st["tokens_per_target_forward"] < 1  # verify + replay per token: what a useless draft costs


def test_stop_token_ends_the_run_like_plain_decoding(smol, smol_tokenizer):
    target, draft, _ = smol
    prompt = smol_tokenizer.encode_chat([{"role": "user", "content": SHORT}], add_generation_prompt=True)
    eos = set(smol_tokenizer.eos_ids)  # answered in a few tokens, then <|im_end|>
    flags = ["--cache_strategy", "recent_global", "--max_cache_length", "20"]
    plain, spec, _ = plain_and_speculative(target, draft, prompt, 24, 4, flags, eos_ids=eos)
    assert spec == plain and spec[-1] in eos and len(spec) < 24


# ---------------------------------------------------------------------------------------------------------------
# Every policy at once on a tiny model, with a draft accepted about half of the time
# ---------------------------------------------------------------------------------------------------------------
TINY_PROMPT_LEN = 24


def tiny_pair(names: list, n_new: int, noise: float):
    """A tiny target whose layers carry the given policies (test_compile's small budgets: all evict) and a draft:
    the same weights plus noise, so that rounds end in full and partial acceptance."""
    cfg = ModelArgs(vocab_size=256, n_layer=len(names), n_head=4, n_local_heads=2, dim=64, intermediate_size=128,
                    block_size=512)
    models = []
    for seed in (0, 1):
        m = random_model(cfg, "cpu", torch.float32, seed=0)
        with torch.no_grad():
            m.output.weight.mul_(20)  # peaked logits: greedy picks are not decided by rounding noise
            g = torch.Generator().manual_seed(seed)
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * p.std() * (noise if seed else 0.0))
        max_seq = TINY_PROMPT_LEN + n_new
        caches = policies.build_caches(cache_args(names), len(names), cfg.n_local_heads, cfg.head_dim, 1, max_seq,
                                       torch.float32, "cpu", prompt_len=TINY_PROMPT_LEN, n_heads=cfg.n_head)
        policies.install(m, caches, max_seq)
        models.append(m)
    prompt = torch.randint(0, 256, (TINY_PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    return models[0], models[1], prompt


def reference_accepted(draft, prompt: list, tokens: list, n_new: int, k: int) -> int:
    """Greedy drafts accepted when the draft proposes from a cache that went through plain decoding of the
    committed tokens (prefill, then one decode step per token), rebuilt from scratch every round."""
    n, accepted = 1, 0  # tokens committed (tokens[n - 1] is the newest, in no cache yet)
    while n_new - n > k:  # speculative_generate's rounds (the last k tokens are plain target steps)
        for c in draft.caches:
            c.reset()
        runtime.prefill(draft, torch.tensor([prompt]), torch.arange(len(prompt)))
        pos, proposals = len(prompt), []
        for t in tokens[:n]:  # teacher-forced; the step on tokens[n - 1] proposes d1
            nxt = runtime.decode_one_token(draft, torch.tensor([[t]]), torch.tensor([pos]))
            pos += 1
        for _ in range(k):
            proposals.append(int(nxt))
            if len(proposals) < k:
                nxt = runtime.decode_one_token(draft, nxt, torch.tensor([pos]))
                pos += 1
        a = 0
        while a < k and proposals[a] == tokens[n + a]:
            a += 1
        accepted += a
        n += a + 1
    return accepted


def test_every_policy_on_a_tiny_model():
    names = sorted(policies.POLICIES)
    n_new, k = 32, 2
    target, draft, prompt = tiny_pair(names, n_new, noise=0.04)  # 14 noisy layers: ~half accepted
    plain, _ = generate.generate(target, prompt, n_new)
    ref = cache_state(target)
    spec, stats = speculative.speculative_generate(target, draft, prompt, n_new, k)
    assert spec == plain
    assert_same_cache_state(ref, target, f"k={k}")
    for name, c in zip(names, target.caches):
        if name != "full":
            assert kept(c) < TINY_PROMPT_LEN + n_new - 1, f"{name} must evict"
    st = stats["speculative"]
    assert 0.1 < st["acceptance_rate"] < 0.9, st  # both kinds of round happen
    assert st["target_replays"] > 0 and st["tokens_per_round"] > 1
    # The draft's cache was restored and caught up exactly too: it proposed what plain decoding would have.
    assert st["accepted"] == reference_accepted(draft, prompt, plain, n_new, k)


# ---------------------------------------------------------------------------------------------------------------
# (c) sampling
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [dict(temperature=0.7), dict(temperature=1.3, top_k=5),
                                 dict(temperature=1.0, top_p=0.8), dict(temperature=0.9, top_k=20, top_p=0.9)])
def test_sampling_probs_is_the_distribution_generate_samples_from(cfg):
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 3
    probs = sampling.probabilities(logits, **cfg)
    assert torch.allclose(probs.sum(-1), torch.ones(1))  # normalised even after top_p: p / q ratios need it
    for seed in range(40):  # the same random numbers draw the same token
        torch.manual_seed(seed)
        a = sampling.sample(logits, **cfg)
        torch.manual_seed(seed)
        assert torch.equal(sampling.draw(probs), a)


def tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


def test_rejection_sampling_reproduces_the_target_distribution():
    """k = 2 on fixed (context-free) distributions: the first emitted token ~ p0, the second (when the round
    emits one) ~ p1, and d1 is accepted with probability sum(min(p0, q0)). The draft is far from the target, so
    a wrong residual or a wrong acceptance test moves these by much more than the bounds."""
    p = torch.tensor([[0.50, 0.05, 0.05, 0.30, 0.10],
                      [0.10, 0.10, 0.60, 0.10, 0.10],
                      [0.20, 0.20, 0.20, 0.20, 0.20]])
    q = torch.tensor([[0.05, 0.60, 0.05, 0.20, 0.10],
                      [0.40, 0.10, 0.10, 0.10, 0.30]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    drafts = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g) for i in range(2)], 1)
    first, second, accepted = torch.zeros(5), torch.zeros(5), 0
    for d in drafts:
        a, tok = speculative.rejection_sample(p, q, d, generator=g)
        a, tok = int(a), int(tok)
        emitted = d[:a].tolist() + [tok]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
        accepted += a > 0
    assert tv(first, p[0]) < 0.02
    assert tv(second, p[1]) < 0.03
    assert accepted / n == pytest.approx(float(torch.minimum(p[0], q[0]).sum()), abs=0.02)


def test_rejection_sampling_with_equal_distributions_accepts_everything():
    p = torch.softmax(torch.randn(4, 30, generator=torch.Generator().manual_seed(0)), -1)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        d = torch.stack([torch.multinomial(p[i], 1, generator=g)[0] for i in range(3)])
        a, tok = speculative.rejection_sample(p, p[:3], d, generator=g)
        assert int(a) == 3 and 0 <= int(tok) < 30


def test_sampling_with_top_k_1_is_greedy_through_rejections(smol):
    """top_k=1 makes every distribution one-hot: the sampling path (rejection, residual, bonus) must reproduce the
    greedy tokens exactly, with a random draft (every round rejects) and evicting caches."""
    target, _, prompt = smol
    draft = tiny_draft(target.config.vocab_size)
    sampling = dict(temperature=0.8, top_k=1)
    plain, spec, stats = plain_and_speculative(target, draft, prompt, 12, 2, CONFIGS["heavy_hitter"],
                                               sampling=sampling)
    setup_caches(target, CONFIGS["heavy_hitter"], len(prompt), len(prompt) + 12)
    greedy, _ = generate.generate(target, prompt, 12)
    assert spec == plain == greedy
    assert stats["speculative"]["target_replays"] > 0


def test_sampled_run_with_a_self_draft(smol):
    target, draft, prompt = smol
    flags, n = CONFIGS["recent_global"], 10
    setup_caches(target, flags, len(prompt), len(prompt) + n)
    setup_caches(draft, flags, len(prompt), len(prompt) + n)
    sampling = dict(temperature=1.0, top_p=0.95)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(speculative.speculative_generate(target, draft, prompt, n, 4, sampling=sampling))
    (a, sa), (b, _), (c, _) = runs
    assert a == b and a != c, "a seed fixes the sample"
    assert len(a) == n and all(0 <= t < target.config.vocab_size for t in a)
    # Target and draft agree up to rounding: the acceptance test u * q < p fails only when u is within rounding of 1.
    assert sa["speculative"]["acceptance_rate"] > 0.9


# ---------------------------------------------------------------------------------------------------------------
# (d) compiled == eager (tiny model), no recompile once warm_up has compiled every length
# ---------------------------------------------------------------------------------------------------------------
def test_compiled_speculative_run_equals_eager():
    # One evicting layer and k = 1 (5 graphs: verify 2 and 1, replay 1, draft 1 and 2): compiling dominates.
    names = ["recent_global"]
    n_new, k = 24, 1
    target, draft, prompt = tiny_pair(names, n_new, noise=0.2)
    eager, stats = speculative.speculative_generate(target, draft, prompt, n_new, k)
    eager_state = cache_state(target)
    assert 0 < stats["speculative"]["acceptance_rate"] < 1
    torch._dynamo.reset()
    counters.clear()
    fns = speculative.compile_fns("cpu", True)
    speculative.warm_up(target, draft, prompt, n_new, k, fns=fns)
    lengths = speculative.graph_lengths(k)
    assert counters["stats"]["unique_graphs"] == sum(len(v) for v in lengths.values())
    with torch._dynamo.config.patch(error_on_recompile=True):  # warm_up compiled every length a run uses
        compiled, cstats = speculative.speculative_generate(target, draft, prompt, n_new, k, fns=fns)
    assert compiled == eager
    assert_same_cache_state(eager_state, target, "compiled")
    assert cstats["speculative"]["accepted"] == stats["speculative"]["accepted"]


# ---------------------------------------------------------------------------------------------------------------
# (e) generate.py
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_draft_dir(tmp_path_factory):
    """A checkpoint folder holding a random 1-layer draft with SmolLM2's vocabulary."""
    d = tmp_path_factory.mktemp("tiny_draft")
    m = tiny_draft(49152)
    torch.save({k: v for k, v in m.state_dict().items() if k != "output.weight"}, d / "model.pth")  # tied head
    m.config.to_json(d / "config.json")
    return d


def test_cli_random_draft_gives_the_plain_tokens_and_statistics(tiny_draft_dir):
    args = ["--prompt", PROMPT, "--max_new_tokens", 10, "--cache_strategy", "recent_global", "--max_cache_length",
            24]
    plain = cli_json(*args)
    spec = cli_json(*args, "--draft_checkpoint_path", tiny_draft_dir, "--speculate_k", 2)
    assert spec["token_ids"] == plain["token_ids"]
    st = spec["stats"]["speculative"]
    assert st["k"] == 2 and st["drafted"] == 2 * st["rounds"] > 0 and st["acceptance_rate"] < 0.5
    for key in ("accepted", "tokens_per_round", "tokens_per_target_forward", "target_forwards"):
        assert key in st
    assert spec["stats"]["kept_tokens"] == plain["stats"]["kept_tokens"]


def test_cli_prints_acceptance_statistics_on_stderr(capsys, tiny_draft_dir):
    generate.main(["--prompt", "Hi", "--max_new_tokens", "6", "--draft_checkpoint_path", str(tiny_draft_dir)])
    out = capsys.readouterr()
    assert "speculative decoding (k=4)" in out.err and "draft tokens accepted" in out.err
    assert "speculative" not in out.out


def cli_error_line(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        generate.main([*map(str, argv)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv,expect", [
    (["--speculate_k", "0", "--draft_checkpoint_path", "{draft}"], "--speculate_k: must be >= 1"),
    (["--speculate_k", "3"], "--draft_checkpoint_path"),
    (["--speculate_k", "8", "--draft_checkpoint_path", "{draft}"], "smaller than --max_new_tokens"),
    (["--speculate_k", "2", "--compile", "--draft_checkpoint_path", "{draft}"], "without --compile on a CPU"),
    (["--batch_size", "2", "--draft_checkpoint_path", "{draft}"], "--batch_size 1"),
    (["--feed_long_prompts", "--draft_checkpoint_path", "{draft}"], "--feed_long_prompts"),
    (["--draft_checkpoint_path", "{missing}"], "not found"),
    (["--draft_checkpoint_path", "{other_vocab}"], "vocabulary (1000 tokens"),
], ids=["k0", "no_draft", "k_too_big", "compile_cpu", "batch", "feed_long", "missing", "vocab"])
def test_bad_speculative_flags(capsys, tmp_path, tiny_draft_dir, argv, expect):
    other = tmp_path / "other"
    other.mkdir()
    ModelArgs(vocab_size=1000, n_layer=1, n_head=2, dim=32).to_json(other / "config.json")
    (other / "model.pth").write_bytes(b"")  # the vocabulary is checked before the weights are read
    paths = dict(draft=tiny_draft_dir, missing=tmp_path / "nowhere" / "model.pth", other_vocab=other)
    argv = [x.format(**paths) for x in argv]
    assert expect in cli_error_line(capsys, "--prompt", "hi", "--max_new_tokens", 8, *argv)


def test_bad_flag_exit_status_in_a_subprocess():
    r = subprocess.run([sys.executable, "generate.py", "--prompt", "hi", "--speculate_k", "2"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: --speculate_k needs a draft model: give --draft_checkpoint_path"]
