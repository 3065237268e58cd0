"""Speculative decoding: a small draft model proposes k tokens, the target verifies them in one forward.

    python generate.py --draft_checkpoint_path DRAFT/model.pth --speculate_k 4 --prompt "..."

One round, with `last` the newest token (known, in neither cache yet) at position p:
  1. the draft proposes d1..dk: one forward over the tokens it has not seen yet (its catch-up, ending with
     `last`), then k - 1 single-token steps;
  2. the target runs ONE multi-token decode forward over [last, d1..dk] at positions p..p+k. model.py inserts
     and attends those k + 1 tokens one by one through the cache policy (the cache passes through the same
     states as in k + 1 single steps, evictions included), while the linears run once over k + 1 tokens;
  3. accept / reject (greedy: accept while the target's argmax equals the draft token, then the target's token;
     sampling: standard rejection sampling, which emits tokens distributed exactly as the target's);
  4. undo: the verify forward also inserted the rejected drafts (and may have evicted for them). Both caches
     are restored from a snapshot taken before the round and the accepted tokens are fed again, so each cache
     holds exactly the tokens of the accepted sequence and has evicted exactly as plain decoding would.

Exactness: the cache states are those of plain decoding for every policy. The logits are equal up to floating-
point rounding (a (k+1)-token matmul does not round like k + 1 one-token matmuls), so greedy output equals
generate.generate's except at exact near-ties of the top two logits; sampled output follows the target's
distribution (the draft only changes how fast it is drawn).

Cost of exactness: a snapshot (one copy of every cache buffer of both models) per round, and on a rejection
one more target forward (the replay of the accepted tokens; there is no cheaper generic undo of an eviction).
"""
import time

import torch
from torch import Tensor

import policies
import quantize
import runtime
from model import ModelArgs
from sampling import draw, probabilities

DEFAULT_K = 4


# ---------------------------------------------------------------------------------------------------------------
# Rejection sampling (the distributions are sampling.probabilities: what sampling.sample draws from, normalised)
# ---------------------------------------------------------------------------------------------------------------
def rejection_sample(p: Tensor, q: Tensor, drafts: Tensor, generator=None):
    """Standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023) for one round.

    p [k+1, V]: the target's distributions after [last, d1..dk]; q [k, V]: the draft's distributions d1..dk were
    drawn from; drafts [k]. d_i is accepted with probability min(1, p[i-1, d_i] / q[i-1, d_i]) while all before
    it were; at the first rejection (index a) the token is drawn from normalize(max(0, p[a] - q[a])); when all k
    are accepted, a bonus token from p[k]. Each emitted token is then distributed exactly as the target's.
    Returns (a, token) as 0-dim tensors on the device (no host sync here)."""
    k = drafts.shape[0]
    idx = drafts.view(k, 1)
    p_d, q_d = p[:k].gather(1, idx).squeeze(1), q.gather(1, idx).squeeze(1)
    u = torch.rand(k, generator=generator, device=p.device, dtype=p.dtype)
    accepted = u * q_d < p_d  # u < p/q without dividing (q_d > 0: d_i was drawn from q)
    a = accepted.long().cumprod(0).sum()  # leading accepts
    # Row k of the residual is p[k] itself (a zero draft row): the bonus token needs no special case.
    residual = (p - torch.cat([q, torch.zeros_like(q[:1])])).clamp(min=0)
    row, fallback = residual.index_select(0, a.view(1)), p.index_select(0, a.view(1))
    # p == q on that row leaves no residual mass; then no rejection can have happened (u < 1 = p/q), except by
    # rounding: fall back to p.
    row = torch.where(row.sum() > 0, row, fallback)
    return a, draw(row, generator).view(())


# ---------------------------------------------------------------------------------------------------------------
# The compiled pieces
# ---------------------------------------------------------------------------------------------------------------
def draft_forward(model, idx: Tensor, input_pos: Tensor, **sampling):
    """The draft's step: feeds idx [1, T] (T = 1: a plain decode step; T > 1: its catch-up after a round) and
    proposes the next token from the last position. Returns (token [1, 1], its distribution [1, V] or None)."""
    logits = model(idx, input_pos)[:, -1]
    if sampling.get("temperature", 0) <= 0:
        return logits.argmax(-1, keepdim=True), None
    probs = probabilities(logits, **sampling)
    return draw(probs), probs


def verify_forward(model, idx: Tensor, input_pos: Tensor, **sampling):
    """The target's multi-token decode step over idx [1, T]. Greedy: its argmax at each position [T]; sampling:
    its distributions [T, V]."""
    logits = model(idx, input_pos)[0]
    if sampling.get("temperature", 0) <= 0:
        return logits.argmax(-1)
    return probabilities(logits, **sampling)


def replay_forward(model, idx: Tensor, input_pos: Tensor):
    """Feeds accepted tokens again after a restore; only the cache update matters (compiled, the output head is
    dead code and dropped)."""
    model(idx, input_pos)


def compile_fns(device: str, compile_decode: bool) -> dict:
    """The three decode-time functions, compiled like the decode step (runtime.compile_decode: fullgraph; CUDA
    graphs on GPU) with static shapes: a multi-token step unrolls its per-token cache loop, so each length is its own graph.
    Lengths used: verify k + 1 (and 1 for the last few tokens), replay 1..k, draft 1..max(2, k - 1); dynamo's
    recompile limit (8 per function) therefore bounds k (checked by check_k)."""
    fns = {"draft": draft_forward, "verify": verify_forward, "replay": replay_forward}
    if compile_decode:
        fns = {name: runtime.compile_decode(fn, device, dynamic=False) for name, fn in fns.items()}
    return fns


MAX_COMPILED_K = 8  # replay lengths 1..k are k graphs of one function: within dynamo's default recompile limit


def graph_lengths(k: int) -> dict:
    """The idx lengths each function sees during speculative_generate (warm_up compiles exactly these)."""
    return {"verify": [k + 1, 1], "replay": list(range(1, k + 1)), "draft": list(range(1, max(2, k - 1) + 1))}


# ---------------------------------------------------------------------------------------------------------------
# Snapshots of the cache state
# ---------------------------------------------------------------------------------------------------------------
class CacheSnapshot:
    """A copy of every registered buffer of a model's caches, restored in place.

    Generic on purpose: every policy keeps all of its mutable decode-time state in registered buffers (K/V or
    their quantized codes, pos, the `seen` counter, scores, hashes, ladder ranks, merge counters and flags, the
    debug shadow cache), so restoring them returns any policy to exactly the state it had. The only Python
    attributes a cache changes are hybrid's _prompt_cls / _profile (prefill only) and _step_cls (rewritten by
    every forward before use). Constant tables (LSH projections, hybrid's vocabulary tables, LaCache's schedule)
    are copied too: nothing tells them apart generically; a tensor shared by several layers is copied once.
    Cost: one copy of all cache memory per take() (and per restore()), and as much memory again.
    copy_ in place keeps every buffer's address, so compiled graphs and CUDA graphs stay valid."""

    def __init__(self, model):
        self.pairs, seen = [], set()
        for cache in model.caches:
            for buf in cache.buffers():
                if id(buf) not in seen:
                    seen.add(id(buf))
                    self.pairs.append((buf, torch.empty_like(buf)))
        self.nbytes = sum(s.numel() * s.element_size() for _, s in self.pairs)

    def take(self):
        for buf, saved in self.pairs:
            saved.copy_(buf)

    def restore(self):
        for buf, saved in self.pairs:
            buf.copy_(saved)


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------
def check_models(target, draft, k: int):
    if target is draft:
        raise ValueError("the draft must be its own model instance (each model holds its own caches)")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft's vocabulary ({draft.config.vocab_size}) differs from the target's "
                         f"({target.config.vocab_size})")
    if k < 1:
        raise ValueError(f"speculate k must be >= 1, got {k}")
    for m in (target, draft):
        c = m.caches[0]
        if c.pos.shape[0] != 1:
            raise ValueError("speculative decoding decodes one sequence (caches set up for batch size 1)")


@torch.no_grad()
def speculative_generate(target, draft, prompt: list, max_new_tokens: int, k: int = DEFAULT_K, *, eos_ids=(),
                         sampling=None, prefill_fn=runtime.prefill, fns=None, callback=None):
    """Decodes one sequence with the target, k draft tokens verified per target forward. Both models' caches must
    be set up (cache.setup) for batch size 1 and the same max_seq_length. Returns (new token ids, stats): the
    timing keys of generate.generate plus "speculative" (rounds, drafted, accepted, acceptance_rate, ...)."""
    check_models(target, draft, k)
    sampling = sampling or {}
    greedy = sampling.get("temperature", 0) <= 0
    fns = fns or compile_fns("cpu", False)
    draft_fn, verify_fn, replay_fn = fns["draft"], fns["verify"], fns["replay"]
    device = target.tok_embeddings.weight.device

    def ids(tokens):
        return torch.tensor([tokens], dtype=torch.long, device=device)

    def positions(start, n):
        return torch.arange(start, start + n, device=device)

    for m in (target, draft):
        for c in m.caches:
            c.reset()
    t0 = time.perf_counter()
    x = ids(prompt)
    first = prefill_fn(target, x, positions(0, len(prompt)), **sampling).clone()
    t_target = time.perf_counter()
    prefill_fn(draft, x, positions(0, len(prompt)), **sampling)
    runtime.synchronize(device)
    tokens = [int(first)]
    t_first = time.perf_counter()
    if callback and tokens[-1] not in eos_ids:
        callback(tokens[-1])
    snap_target, snap_draft = CacheSnapshot(target), CacheSnapshot(draft)  # after prefill: buffers are final
    st = dict(rounds=0, drafted=0, accepted=0, target_forwards=0, target_replays=0, target_single_steps=0,
              draft_forwards=0)
    pos = len(prompt)  # position of tokens[-1], the newest token, which neither cache holds yet
    pending = [tokens[-1]]  # tokens the draft has not seen yet (ending with tokens[-1])

    def emit(new):
        for t in new:
            tokens.append(t)
            if callback and t not in eos_ids:
                callback(t)

    while len(tokens) < max_new_tokens and tokens[-1] not in eos_ids:
        if max_new_tokens - len(tokens) <= k:
            # The last few tokens: a round would write positions past the caches' max_seq_length (sized for
            # prompt + max_new_tokens). Plain target steps (the verify graph of length 1).
            out = verify_fn(target, ids(tokens[-1:]), positions(pos, 1), **sampling)
            nxt = int(out[0]) if greedy else int(draw(out)[0])
            st["target_forwards"] += 1
            st["target_single_steps"] += 1
            pos += 1
            emit([nxt])
            continue
        # 1. the draft proposes: its catch-up forward (ending with tokens[-1]) gives d1, then k - 1 single steps.
        n = len(pending)
        tok, prob = draft_fn(draft, ids(pending), positions(pos - n + 1, n), **sampling)
        if k > 1:  # the draft now holds everything up to tokens[-1] (k = 1: it never needs restoring, see 4.)
            snap_draft.take()
        drafts, probs = [tok.clone()], [None if prob is None else prob.clone()]  # clone: CUDA graph outputs
        for i in range(1, k):
            tok, prob = draft_fn(draft, drafts[-1], positions(pos + i, 1), **sampling)
            drafts.append(tok.clone())
            probs.append(None if prob is None else prob.clone())
        st["draft_forwards"] += k
        # 2. the target verifies [tokens[-1], d1..dk] in one multi-token decode forward.
        snap_target.take()
        d = torch.cat(drafts, dim=1)  # [1, k]
        out = verify_fn(target, torch.cat([ids(tokens[-1:]), d], dim=1), positions(pos, k + 1), **sampling)
        st["target_forwards"] += 1
        # 3. accept / reject: one host sync per round.
        if greedy:
            agree = (d[0] == out[:k]).long()
            a = agree.cumprod(0).sum()
            last = out.index_select(0, a.view(1)).view(())
        else:
            a, last = rejection_sample(out, torch.cat(probs, dim=0), d[0])
        host = torch.cat([d[0], a.view(1), last.view(1)]).tolist()
        a, new = host[k], host[:host[k]] + [host[k + 1]]
        st["rounds"] += 1
        st["drafted"] += k
        st["accepted"] += a
        # Generation ends at a stop token: nothing after it is emitted (or kept in the cache).
        stop = next((i for i, t in enumerate(new) if t in eos_ids), None)
        if stop is not None:
            new = new[:stop + 1]
        m = len(new) - 1  # drafts kept; new[-1] is the newest token, not in any cache
        # 4. undo. The target must hold [tokens[-1]] + new[:m]; it inserted [tokens[-1], d1..dk].
        if m < k:
            snap_target.restore()
            replay_fn(target, ids(tokens[-1:] + new[:m]), positions(pos, m + 1))
            st["target_forwards"] += 1
            st["target_replays"] += 1
        emit(new)
        pos += m + 1
        # The draft holds up to d_{k-1}: if fewer were kept it goes back to tokens[-1] of this round (its
        # snapshot) and catches up next round, in the forward that proposes (no separate replay).
        if m < k - 1:
            snap_draft.restore()
            pending = new
        else:
            pending = new[k - 1:]  # m = k - 1: [new token]; m = k: [dk, bonus token]
    runtime.synchronize(device)
    t_end = time.perf_counter()
    decode_steps = len(tokens) - 1
    st["acceptance_rate"] = st["accepted"] / st["drafted"] if st["drafted"] else 0.0
    # Per round the target emits a + 1 tokens; per target forward, counting replays and single steps.
    st["tokens_per_round"] = (decode_steps - st["target_single_steps"]) / st["rounds"] if st["rounds"] else 0.0
    st["tokens_per_target_forward"] = decode_steps / st["target_forwards"] if st["target_forwards"] else 0.0
    st["k"] = k
    st["snapshot_bytes"] = snap_target.nbytes + snap_draft.nbytes  # memory the snapshots add
    st["draft_kv_cache_bytes"] = sum(c.nbytes() for c in draft.caches)
    return tokens, {
        "prompt_tokens": len(prompt),
        "new_tokens": len(tokens),
        "time_to_first_token_s": t_first - t0,  # both prefills (the draft's is part of the cost)
        "draft_prefill_s": t_first - t_target,
        "decode_s": t_end - t_first,
        "decode_tokens_per_s": decode_steps / (t_end - t_first) if decode_steps else 0.0,
        "speculative": st,
    }


@torch.no_grad()
def warm_up(target, draft, prompt: list, max_new_tokens: int, k: int, *, sampling=None,
            prefill_fn=runtime.prefill, fns=None):
    """Compiles every graph speculative_generate can use (each length of each function, see graph_lengths), so
    compile time stays out of the timed run: which replay lengths a run needs depends on what is accepted.
    Each call starts from the prefilled caches (restored from a snapshot); lengths that cannot occur for this
    max_new_tokens (positions past max_seq_length) are skipped."""
    sampling = sampling or {}
    device = target.tok_embeddings.weight.device
    for m in (target, draft):
        for c in m.caches:
            c.reset()
    n = len(prompt)
    x = torch.tensor([prompt], dtype=torch.long, device=device)
    for m in (target, draft):
        prefill_fn(m, x, torch.arange(n, device=device), **sampling)
    snaps = {"target": CacheSnapshot(target), "draft": CacheSnapshot(draft)}
    for s in snaps.values():
        s.take()
    # Rounds happen only while more than k tokens remain after the first; otherwise single target steps only.
    lengths = graph_lengths(k) if max_new_tokens - 1 > k else {"verify": [1]}
    for name, todo in lengths.items():
        model = draft if name == "draft" else target
        kw = {} if name == "replay" else sampling
        for T in todo:
            for _ in range(2):  # CUDA graph trees record on the second call
                idx = torch.tensor([prompt[:T]], dtype=torch.long, device=device)  # fresh: strides are guarded
                fns[name](model, idx, torch.arange(n, n + T, device=device), **kw)
                snaps["draft" if name == "draft" else "target"].restore()
    runtime.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# generate.py's flags (ValueError: generate.main reports it as one "error:" line, exit 2)
# ---------------------------------------------------------------------------------------------------------------
def check_args(a, batch: int, device: str = "cpu") -> int:
    """Validates --draft_checkpoint_path / --speculate_k before anything is loaded; returns k."""
    if a.draft_checkpoint_path is None:
        raise ValueError("--speculate_k needs a draft model: give --draft_checkpoint_path")
    k = DEFAULT_K if a.speculate_k is None else a.speculate_k
    if k < 1:
        raise ValueError(f"--speculate_k must be >= 1, got {k}")
    if k >= a.max_new_tokens:
        raise ValueError(f"--speculate_k {k} must be smaller than --max_new_tokens ({a.max_new_tokens}): no round of "
                         "k drafts would fit, every token would be a plain target step")
    if a.compile and not str(device).startswith("cuda"):
        raise ValueError(f"--compile with speculative decoding compiles {sum(len(v) for v in graph_lengths(k).values())}"
                         f" graphs of both models (about a minute each on a CPU); run it without --compile on a CPU, "
                         "where it does not speed decoding up anyway (see README)")
    if a.compile and k > MAX_COMPILED_K:
        raise ValueError(f"--speculate_k {k} with --compile: at most {MAX_COMPILED_K} (one compiled graph per "
                         "replay length, within torch.compile's recompile limit)")
    if batch > 1:
        raise ValueError("speculative decoding (--draft_checkpoint_path) decodes one sequence: give one prompt "
                         "and --batch_size 1")
    if a.feed_long_prompts or a.prefill_chunk:
        raise ValueError("--feed_long_prompts and --prefill_chunk are not supported with --draft_checkpoint_path")
    return k


def load_draft(weights, target, a, tokenizer, device, dtype, prompt_len: int, max_seq_length: int):
    """The draft model from its checkpoint (cli.resolve_checkpoint's path), with the same cache flags as the
    target, built by policies.setup on its own model."""
    vocab = ModelArgs.from_json(weights.parent / "config.json").vocab_size  # checked before loading the weights
    if vocab != target.config.vocab_size:
        raise ValueError(f"the draft's vocabulary ({vocab} tokens, {weights.parent}/config.json) differs from the "
                         f"target's ({target.config.vocab_size}); the draft must share the target's tokenizer")
    draft = quantize.load_model(weights, device, dtype)
    if draft is target:
        raise ValueError("the draft and the target are one model object (each needs its own caches)")
    policies.setup(draft, a, batch_size=1, prompt_len=prompt_len, max_seq_length=max_seq_length, tokenizer=tokenizer)
    return draft


def format_stats(st: dict) -> str:
    return (f"speculative decoding (k={st['k']}): {st['rounds']} rounds, {st['accepted']}/{st['drafted']} draft tokens "
            f"accepted ({100 * st['acceptance_rate']:.1f}%), {st['tokens_per_round']:.2f} tokens per round, "
            f"{st['tokens_per_target_forward']:.2f} tokens per target forward ({st['target_forwards']} forwards: "
            f"{st['rounds']} verify, {st['target_replays']} replay, {st['target_single_steps']} single)")
