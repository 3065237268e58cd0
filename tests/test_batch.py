"""Batched decoding (issues 7, 16): prompts of different lengths decoded together.

One tiny random model carries every registered policy (one layer each, as in tests/test_compile.py) plus the
score-based ones in position_mode cache, the debug meter, the keep-set rules and int8 storage. Every layer holds the
whole batch in one cache (one scoring and one attention call per step).
Each sequence of a batch must produce the greedy tokens and keep the positions (every layer, every KV head) it
produces and keeps when decoded alone; the compiled batched step must compile once and keep doing so while
sequences finish at different steps.
"""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import cache as kvcache
import generate
import policies
import runtime
from model import ModelArgs, random_model
from tests.test_compile import cache_args, layer_groups

PROMPT_LENS = [24, 31, 19]
NEW = 30


def build(cfg, max_seq, batch):
    """Every group's caches (one per layer) for `batch` sequences, built the way policies.setup builds them."""
    def one(b):
        caches = []
        for _, strategies, extra in layer_groups():
            caches += policies.build_caches(cache_args(strategies, **extra), len(strategies), cfg.n_local_heads,
                                            cfg.head_dim, b, max_seq, torch.float32, "cpu",
                                            prompt_len=max(PROMPT_LENS), n_heads=cfg.n_head)
        return caches
    return one(batch)


def layer_names():
    return [(g, s) for g, strategies, _ in layer_groups() for s in strategies]


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelArgs(vocab_size=256, n_layer=len(layer_names()), n_head=4, n_local_heads=2, dim=64,
                    intermediate_size=128, block_size=512)
    model = random_model(cfg, "cpu", torch.float32, seed=0)
    with torch.no_grad():  # logits far from ties: greedy picks are not decided by rounding noise
        model.output.weight.mul_(20)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]
    max_seq = max(PROMPT_LENS) + NEW
    return model, cfg, prompts, max_seq


def sequence_state(caches, b):
    """Sequence b's positions, tokens seen and attention loss in every layer."""
    out = []
    for c in caches:
        with c.row_view(b) as r:
            out.append((r.pos.clone(), int(r.seen), r.loss_meter.value() if r.loss_meter is not None else None))
    return out


def decode_alone(tiny, **options):
    """Each prompt decoded alone: (tokens, sequence_state, cache_stats) per prompt."""
    model, cfg, prompts, max_seq = tiny
    out = []
    for p in prompts:
        policies.install(model, build(cfg, max_seq, 1), max_seq)
        tokens, _ = generate.generate(model, p, NEW, **options)
        out.append((tokens, sequence_state(model.caches, 0), kvcache.cache_stats(model)))
    return out


@pytest.fixture(scope="module")
def alone(tiny):
    return [(tokens, state) for tokens, state, _ in decode_alone(tiny)]


@pytest.fixture(scope="module")
def batched(tiny):
    model, cfg, prompts, max_seq = tiny
    policies.install(model, build(cfg, max_seq, len(prompts)), max_seq)
    tokens, stats = generate.generate_batch(model, prompts, NEW)
    caches = model.caches  # the model gets other caches in other fixtures: keep this run's
    return tokens, stats, caches, kvcache.cache_stats(model)


def test_every_policy_holds_the_batch_in_one_cache(batched):
    _, _, caches, _ = batched
    assert {type(c).__name__ for c in caches} == {c.__name__ for c in policies.POLICIES.values()}
    for c in caches:
        assert c.pos.shape[0] == c.seen.shape[0] == len(PROMPT_LENS)
        for name in c.policy_buffers():
            assert getattr(c, name).shape[0] == len(PROMPT_LENS), f"{type(c).__name__}.{name}: batch first"


def test_each_sequence_decodes_as_alone(alone, batched):
    tokens, stats, _, _ = batched
    assert stats["new_tokens"] == [NEW] * len(PROMPT_LENS) and stats["prompt_tokens"] == PROMPT_LENS
    for b, (alone_tokens, _) in enumerate(alone):
        assert tokens[b] == alone_tokens, f"sequence {b}"
    assert len({tuple(t) for t in tokens}) == len(tokens), "different prompts should give different outputs"


def test_each_sequence_keeps_the_positions_it_keeps_alone(alone, batched):
    _, _, caches, _ = batched
    evicted = set()
    for b, (_, alone_state) in enumerate(alone):
        for name, (pos, seen, loss), (a_pos, a_seen, a_loss) in zip(layer_names(), sequence_state(caches, b),
                                                                    alone_state):
            assert torch.equal(pos, a_pos), f"sequence {b}, layer {name}: other positions than alone"
            assert seen == a_seen == PROMPT_LENS[b] + NEW - 1  # the last token is sampled, not yet inserted
            assert loss == pytest.approx(a_loss, rel=1e-5, abs=1e-9), f"sequence {b}, layer {name}: attention loss"
            if (pos >= 0).sum(-1).max() < seen:
                evicted.add(name[1])
    assert evicted >= set(policies.POLICIES) - {"full"}, "every policy but full must evict in this run"


@pytest.fixture(scope="module")
def fed(tiny):
    """--feed_long_prompts: each prompt alone, then the three together (they feed 10, 15 and 22 tokens)."""
    model, cfg, prompts, max_seq = tiny
    alone = decode_alone(tiny, feed_long_prompts=True)
    policies.install(model, build(cfg, max_seq, len(prompts)), max_seq)
    assert kvcache.prefill_budget(model) - 1 < min(PROMPT_LENS)
    tokens, stats = generate.generate_batch(model, prompts, NEW, feed_long_prompts=True)
    return alone, tokens, stats, model.caches


def test_fed_prompts_decode_and_keep_as_alone(fed, alone):
    fed_alone, tokens, stats, caches = fed
    assert stats["new_tokens"] == [NEW] * len(PROMPT_LENS)
    for b, (alone_tokens, _, alone_stats) in enumerate(fed_alone):
        assert tokens[b] == alone_tokens, f"sequence {b}"
        at_end = stats["sequence_cache_stats"][b]  # taken when sequence b finished
        for key in ("seen_tokens", "kept_tokens"):
            assert at_end[key] == alone_stats[key], f"sequence {b}: {key}"
    last = PROMPT_LENS.index(max(PROMPT_LENS))  # feeds the longest, finishes last: its state is the final one
    batch_state, alone_state = sequence_state(caches, last), fed_alone[last][1]
    for name, (pos, seen, _), (a_pos, a_seen, _) in zip(layer_names(), batch_state, alone_state):
        assert torch.equal(pos, a_pos) and seen == a_seen, f"layer {name}"
    assert [t[0] for t in fed_alone] != [t[0] for t in alone], "feeding the prompt changed nothing: flag ignored?"


def test_batch_statistics_are_per_sequence(batched):
    _, _, caches, s = batched
    assert s["batch_size"] == len(PROMPT_LENS)
    assert [x["seen_tokens"] for x in s["sequences"]] == [n + NEW - 1 for n in PROMPT_LENS]
    assert s["kv_cache_bytes"] == sum(c.nbytes() for c in caches)
    assert len({x["kv_cache_bytes"] for x in s["sequences"]}) == 1  # every sequence holds the same buffers
    kept = [x["kept_tokens"] for x in s["sequences"]]
    assert all(0 < k < n + NEW - 1 for k, n in zip(kept, PROMPT_LENS)) and s["kept_tokens"] == sum(kept)


def test_a_batched_cache_prefills_one_named_sequence(batched):
    _, _, caches, _ = batched
    c = caches[0]
    q = k = v = torch.zeros(1, 2, 3, 16)
    for row, needle in ((None, "give row"), (3, "no sequence 3")):
        with pytest.raises(ValueError, match=needle):
            c.prefill(torch.arange(3), k, v, q, row=row)


def every_policy_model(dim: int):
    """A small random model with every registered policy, one layer each (sorted names): compiles CI-sized."""
    strategies = sorted(policies.POLICIES)
    cfg = ModelArgs(vocab_size=256, n_layer=len(strategies), n_head=4, n_local_heads=2, dim=dim,
                    intermediate_size=2 * dim, block_size=512)
    m = random_model(cfg, "cpu", torch.float32, seed=1)
    with torch.no_grad():  # logits far from ties
        m.output.weight.mul_(20)
    return m, strategies


def test_compiled_batch_compiles_once_while_sequences_finish(tiny):
    _, _, prompts, max_seq = tiny
    prompts = prompts[:2]
    m, strategies = every_policy_model(64)
    policies.install(m, policies.build_caches(cache_args(strategies), len(strategies), 2, 16, len(prompts), max_seq,
                                              torch.float32, "cpu", prompt_len=max(PROMPT_LENS), n_heads=4), max_seq)
    free, _ = generate.generate_batch(m, prompts, NEW)
    # A stop token that sequence 0 emits early and sequence 1 not at that step (both may emit it elsewhere).
    eos = {next(t for i, t in enumerate(free[0][3:], 3) if t not in free[1][:i + 1])}
    eager, _ = generate.generate_batch(m, prompts, NEW, eos_ids=eos)
    assert len({len(t) for t in eager}) > 1, "sequences must finish at different steps"
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(runtime.decode_one_token, fullgraph=True)
    generate.generate_batch(m, prompts, 2, decode_fn=fn)
    first = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled, stats = generate.generate_batch(m, prompts, NEW, eos_ids=eos, decode_fn=fn)
    assert first == 1 and counters["stats"]["unique_graphs"] == 1
    assert compiled == eager
    assert stats["decode_steps"] == max(len(t) for t in compiled) - 1
    # each sequence's statistics are taken at its end, not after the steps it made once finished
    assert [s["seen_tokens"] for s in stats["sequence_cache_stats"]] == \
        [n + len(t) - 1 for n, t in zip(PROMPT_LENS, compiled)]


def decode_graph_size(batch: int) -> int:
    """Nodes of the traced decode step of a model with every policy (one layer each), at this batch size."""
    strategies = sorted(policies.POLICIES)
    cfg = ModelArgs(vocab_size=64, n_layer=len(strategies), n_head=4, n_local_heads=2, dim=32,
                    intermediate_size=64, block_size=128)
    m = random_model(cfg, "cpu", torch.float32, seed=1)
    policies.install(m, policies.build_caches(cache_args(strategies), len(strategies), 2, 8, batch, 64,
                                              torch.float32, "cpu", prompt_len=24, n_heads=4), 64)
    prompts = [list(range(24 - b)) for b in range(batch)]
    for b, p in enumerate(prompts):
        runtime.prefill(m, torch.tensor([p]), torch.arange(len(p)), row=b)
    sizes = []

    def count(gm, example_inputs):
        sizes.append(len(gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(runtime.decode_one_token, backend=count, fullgraph=True)
    step(m, torch.zeros(batch, 1, dtype=torch.long), torch.tensor([[len(p)] for p in prompts]))
    return sizes[0]


def test_the_batched_step_does_not_grow_with_the_batch():
    # one scoring, one argmin, one scatter and one attention call per layer for all sequences
    assert decode_graph_size(2) == decode_graph_size(5)


def test_dynamic_batch_compiles_one_graph_for_every_batch_size(tiny):
    """--dynamic_batch (runtime.compile_decode any_batch): batches of 2 and then 3, each in freshly built caches,
    run through one compiled graph, with the tokens of the eager step. Fails when any policy's step specialises on
    the batch size (a second graph) or when the symbolic step computes something else."""
    _, _, prompts, max_seq = tiny
    m, strategies = every_policy_model(32)

    def install(batch):
        policies.install(m, policies.build_caches(cache_args(strategies), len(strategies), 2, 8, batch, max_seq,
                                                  torch.float32, "cpu", prompt_len=max(PROMPT_LENS), n_heads=4),
                         max_seq)
    torch._dynamo.reset()
    counters.clear()
    step = runtime.compile_decode(runtime.decode_one_token, "cpu", any_batch=True)
    for batch in (2, 3):
        install(batch)
        eager, _ = generate.generate_batch(m, prompts[:batch], 12)
        install(batch)
        with torch._dynamo.config.patch(error_on_recompile=batch > 2):
            compiled, _ = generate.generate_batch(m, prompts[:batch], 12, decode_fn=step)
        assert compiled == eager, batch
    assert counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------------------------------------------------------
# generate.py --batch_size on SmolLM2
# ---------------------------------------------------------------------------------------------------------------
from tests.test_generate_cli import SHORT, cli_json, memoised_smol  # noqa: E402,F401 (autouse: SmolLM2 loaded once)

CLI = ["--max_new_tokens", 10, "--cache_strategy", "recent_global", "--max_cache_length", 40, "--recent_window", 8]
PROMPTS = [SHORT, "Name three colors of the rainbow, one per line, and nothing else please."]


def test_cli_batch_equals_single_runs():
    batch = cli_json("--prompt", *PROMPTS, *CLI)
    assert batch["stats"]["batch_size"] == 2
    for prompt, seq in zip(PROMPTS, batch["sequences"]):
        alone = cli_json("--prompt", prompt, *CLI)
        assert seq["token_ids"] == alone["token_ids"] and seq["text"] == alone["text"]
        assert seq["prompt_token_ids"] == alone["prompt_token_ids"]
        # statistics as of the sequence's end (it may have stepped on after its end-of-sequence token)
        assert seq["stats"]["seen_tokens"] == alone["stats"]["seen_tokens"]
        assert seq["stats"]["kept_tokens"] == alone["stats"]["kept_tokens"] < alone["stats"]["seen_tokens"]


def test_cli_batch_repeats_prompts_and_rejects_bad_sizes(capsys):
    out = cli_json("--prompt", SHORT, "--batch_size", 2, "--max_new_tokens", 3)
    assert [s["prompt_token_ids"] for s in out["sequences"]][0] == out["sequences"][1]["prompt_token_ids"]
    assert out["sequences"][0]["token_ids"] == out["sequences"][1]["token_ids"]
    for args, needle in ((["--prompt", "a", "b", "c", "--batch_size", 2], "do not fit --batch_size 2"),
                         (["--batch_size", 0], "--batch_size: must be >= 1")):
        with pytest.raises(SystemExit) as e:
            generate.main([str(x) for x in args])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error:") and "\n" not in err and needle in err, err
