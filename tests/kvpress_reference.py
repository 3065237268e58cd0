"""Reference prompt keep-sets and scores from NVIDIA kvpress 0.5.5 (a helper for tests, not a test file).

The engine's prompt compressors are compared with kvpress's presses on the same model and prompt:
transformers' LlamaForCausalLM (the ``hf_smol`` fixture) runs a plain prefill, and kvpress's OWN code scores
and selects the positions.  Nothing of a press is re-implemented here: the keep-set is read back from what the
press's ``compress`` returns (the surviving key rows are matched, bit for bit, to the prefill's key rows) or from
the ``module.masked_key_indices`` a head-wise press (AdaKV, KVzip) leaves for kvpress's attention patch.

Install (CI: PyPI only)::

    pip install --no-deps kvpress==0.5.5

``--no-deps`` is enough.  ``import kvpress`` itself needs cachetools, datasets and fire (imported at module
level by presses this file does not use: DuoAttention, LUKV, ExpectedAttentionStats); when they are missing
the press modules used here are loaded WITHOUT running ``kvpress/__init__.py`` (a bare ``kvpress`` package
object whose ``__path__`` is the installed one), which also skips kvpress's global patch of transformers'
attention functions (it is only needed to decode on a head-wise-masked cache, which is not done here).
``KVPRESS_IMPORT_MODE`` says which way was taken.

Two routes, both running kvpress's code on the reference model:

* ``route="direct"`` (default, every press but KVzip): one plain prefill of ``hf_model`` into a DynamicCache,
  capturing per layer the input of ``self_attn`` (``hidden_states``, after input_layernorm), ``position_embeddings``
  (cos, sin) and ``attention_mask``; keys (after RoPE) and values from the cache.  Then per layer
  ``press.compress(module, hidden_states, keys, values, None, kwargs)`` with ``module = layers[i].self_attn``.
  ``attentions`` is None as in kvpress's hook under sdpa (SnapKV / TOVA then compute their window attention
  from hidden_states themselves).  The scores are recorded from the press's ``score`` as ``compress`` calls it.
* ``route="hook"``: kvpress's own context manager around one prefill forward (``with press(model): model(...)``),
  the normal kvpress path.  transformers 5.25 (not yet 5.2.0) renamed the attention layer's cache kwarg
  ``past_key_values`` to ``cache`` and no longer passes ``cache_position``; kvpress's ``forward_hook`` reads both,
  so with it every press fails with ``KeyError: 'past_key_values'`` (KVzip: in its wrapped ``LlamaModel.forward``,
  or ``AttributeError: 'NoneType' object has no attribute 'layers'`` in its hook).  This route wraps the press's
  ``forward_hook`` with an adapter that adds ``past_key_values`` (= ``cache``) and ``cache_position``
  (= the last q_len positions of the layer's cache) when they are missing; with an older transformers the
  adapter changes nothing.  KVzip (several forwards: the context-reconstruction passes) only has this route.

For a per-layer press the two routes give the same keep-sets and scores, bit for bit (compressing layer l inside
the forward does not change what layer l+1 sees in that forward); checked on SmolLM2 for every press here, with
transformers 5.25 (adapter) and 5.2.0 (kvpress's path unchanged), which also agree with each other.
Every attribute the presses set on the model (self_attn.rotary_emb, masked_key_indices, KVzip's forward and
config.name_or_path) is undone afterwards.  AdaKV / CriticalAdaKV / KVzip refuse eager attention (the
``hf_smol`` fixture uses sdpa).

API (``input_ids``: LongTensor [1, T] or [T], or a list of ints; batch size 1 only, as kvpress)::

    require_kvpress()                       # pytest.skip(reason) when kvpress 0.5.5 cannot be loaded
    kvpress_keep_masks(hf_model, input_ids, press_name, compression_ratio, **kw) -> list[BoolTensor [H, T]]
    kvpress_keep_sets(hf_model, input_ids, press_name, compression_ratio, **kw)
        -> list[LongTensor [H, n_kept]]     sorted kept positions per KV head, one entry per layer
           (head-wise presses adakv, criticaladakv, kvzip, whose count differs per head: per layer a list of
            H LongTensors [n_kept_h]; masks are the uniform form for every press)
    kvpress_scores(hf_model, input_ids, press_name, compression_ratio, **kw) -> list[FloatTensor [H, T]]
    kvpress_reference(...) -> KvpressResult (masks, keep_sets(), scores, inner_scores, press object, notes)
    capture_prefill(hf_model, input_ids) -> PrefillCapture   (cached for the last (model, prompt): one prefill
                                                              serves every press on that prompt)
    make_press(press_name, compression_ratio, inner=None, inner_kwargs=None, **press_kwargs) -> the kvpress object
    PRESS_NOTES[press_name]: what the press scores and protects

``press_name``: one of ``PRESS_NAMES``.  Wrappers take the inner press: ``press_name="adakv", inner="snapkv"``
or ``press_name="adakv(snapkv)"``; ``inner_kwargs={...}`` go to the inner press, ``**press_kwargs`` to the
named press (e.g. ``window_size=``, ``n_sink=``, ``chunk_length=``, ``alpha_safeguard=``, ``first_stage_ratio=``).
``compression_ratio`` is kvpress's: the fraction of the prompt REMOVED; presses keep
``max(1, int(T * (1 - compression_ratio)))`` positions per head (ChunkKV: whole chunks; AdaKV / KVzip: that
many per head on average over the layer's heads (AdaKV) or over all layers and heads (KVzip, layerwise=False)).

Scores are per layer [n_kv_heads, T] (batch dimension removed), higher = kept first:
ScorerPress presses: ``press.score``; criticalkv: CriticalKVPress.score (the inner score reweighted by
||V W_o||_1, the stage-1 picks set to float max), the inner one is in ``KvpressResult.inner_scores``;
chunkkv / adakv: the inner press's score (what they select from); kvzip: its ``score_val`` for the layer
(before the sinks are set to the maximum; positions before its chat-template prefix are never scored: 0).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import types
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

KVPRESS_VERSION = "0.5.5"
REPO = Path(__file__).resolve().parent.parent
SMOL_DIR = REPO / "checkpoints" / "HuggingFaceTB" / "SmolLM2-135M-Instruct"

# press name -> (module, class); "wrapper" presses take an inner ScorerPress
_SCORERS = {
    "knorm": ("knorm_press", "KnormPress"),
    "snapkv": ("snapkv_press", "SnapKVPress"),
    "streaming_llm": ("streaming_llm_press", "StreamingLLMPress"),
    "tova": ("tova_press", "TOVAPress"),
    "keydiff": ("keydiff_press", "KeyDiffPress"),
    "expected_attention": ("expected_attention_press", "ExpectedAttentionPress"),
}
_WRAPPERS = {
    "chunkkv": ("chunkkv_press", "ChunkKVPress"),
    "criticalkv": ("criticalkv_press", "CriticalKVPress"),
    "adakv": ("adakv_press", "AdaKVPress"),
    "criticaladakv": ("criticalkv_press", "CriticalAdaKVPress"),
}
_OTHERS = {"kvzip": ("kvzip_press", "KVzipPress")}
PRESS_NAMES = tuple(_SCORERS) + tuple(_WRAPPERS) + tuple(_OTHERS)
HEADWISE = ("adakv", "criticaladakv", "kvzip")  # kept count differs per head: masks, not a [H, n] tensor
_MODULES = ("base_press", "scorer_press", *{m for m, _ in (*_SCORERS.values(), *_WRAPPERS.values(),
                                                           *_OTHERS.values())})

# What each press scores and protects in kvpress 0.5.5 (read from its sources; H = KV heads, g = query heads per
# KV head, n_kept = max(1, int(T * (1 - compression_ratio))), defaults in brackets).
PRESS_NOTES = {
    "knorm": "keys only: score = -||k||_2 of the cached (post-RoPE) key, per KV head; no sinks, no window.",
    "snapkv": "queries of the last window_size [64] positions = RoPE(q_proj(hidden_states)) with the layer's cos/sin; "
              "softmax (fp32) over all T keys, causal inside the window; columns of the first T-64 keys, mean over "
              "the window queries, avg_pool1d(kernel_size [5], padding 2, zero-padded edges count), then MEAN over the "
              "g query heads of each KV head; the window gets (layer-wide max)+1: always kept. Needs T > window_size.",
    "streaming_llm": "positional: keeps positions [0, n_sink [4]) and the last n_kept - n_sink; same in every head.",
    "tova": "the LAST position's query (RoPE(q_proj)) over all T keys (softmax incl. itself); MEAN over ALL query "
            "heads (not per group), so every KV head gets the same scores and keep-set; the last position gets "
            "max+1: always kept.",
    "keydiff": "keys only: anchor = mean over all T positions of the L2-normalised keys (per KV head); "
               "score = -cos(k, anchor); no sinks, no window (the paper's block-wise variant is BlockPress).",
    "expected_attention": "queries = q_proj(hidden_states[n_sink [4]:]) before RoPE; their mean and covariance "
                          "(divided by N); the RoPE rotation averaged over the next n_future_positions [512] "
                          "positions T..T+511 (needs self_attn.rotary_emb) applied to both; per query head "
                          "softmax over keys n_sink.. of mu.k/sqrt(d) + k'Sigma k/(2d); MEAN over the g query heads; "
                          "times ||v||_2 "
                          "(use_vnorm [True], epsilon [0]); the first n_sink get max+1: always kept.",
    "chunkkv": "inner scores summed over the KV heads, averaged per chunk of chunk_length [20] (a trailing partial "
               "chunk is averaged on its own); keeps the top max(1, int(n_chunks * (1 - ratio))) whole chunks: the "
               "same positions in every head, n_kept a multiple of 20 (+ the partial chunk), not T*(1-ratio).",
    "criticalkv": "stage 1: the top int((1-ratio)*T*first_stage_ratio [0.5]) positions by the inner score are set to "
                  "float max; stage 2: (inner + epsilon [1e-4]) * MEAN over the g query heads of ||v_h W_o,h||_1 "
                  "(the head's slice of o_proj); top n_kept per KV head. Warns for expected_attention with use_vnorm.",
    "adakv": "inner scores; per head the top int(n_kept*alpha_safeguard [0.2]) (at least 1) set to float max; then the "
             "H*(T-n_kept) lowest scores of the whole layer (all heads flattened) are masked: per-head counts differ, "
             "their sum is H*n_kept. Keys are not removed (masked_key_indices; eager attention refused).",
    "criticaladakv": "AdaKV's head budgets + CriticalKV's two stages inside each head's budget.",
    "kvzip": "several forwards: prefix_length = length of the chat template's prefix (24 tokens for SmolLM2, default "
             "system prompt) - the first prefix_length prompt positions are ASSUMED to be that prefix and never scored "
             "(0; evicted first, except the n_sink [4] sinks, set to max+1); the rest is re-fed in chunks of "
             "chunk_size [2048] as '\\n\\nRepeat the previous context exactly.' + the template's suffix + the chunk on "
             "top of the prefilled cache; score = max over the g query heads and all re-fed queries of the softmax "
             "(over sinks + the chunk's cached keys + the re-fed keys, not the whole cache); then the "
             "int(L*H*T*ratio) lowest over ALL layers and heads are masked (layerwise [False]): per-layer and per-head "
             "counts differ.",
}

KVPRESS_IMPORT_MODE: str | None = None  # "package" (import kvpress) or "bare (...why...)"
_KV: types.SimpleNamespace | None = None
_UNAVAILABLE: str | None = None


class KvpressUnavailable(RuntimeError):
    """kvpress 0.5.5 cannot be loaded here; str(exc) is the reason (use it for pytest.skip)."""


# ----------------------------------------------------------------------------------------------- loading
def _load_bare(spec) -> None:
    """Import kvpress.presses.<x> without executing kvpress/__init__.py (and kvpress/presses/__init__.py)."""
    for name in [n for n in sys.modules if n == "kvpress" or n.startswith("kvpress.")]:
        del sys.modules[name]  # a failed `import kvpress` leaves half of it behind
    pkgdir = os.path.dirname(spec.origin)
    pkg = types.ModuleType("kvpress")
    pkg.__path__, pkg.__file__, pkg.__package__ = [pkgdir], spec.origin, "kvpress"
    pkg.__kvpress_reference_bare__ = True
    sub = types.ModuleType("kvpress.presses")
    sub.__path__, sub.__package__ = [os.path.join(pkgdir, "presses")], "kvpress.presses"
    pkg.presses = sub
    sys.modules["kvpress"], sys.modules["kvpress.presses"] = pkg, sub
    for m in _MODULES:
        importlib.import_module(f"kvpress.presses.{m}")


def load_kvpress() -> types.SimpleNamespace:
    """The press classes (attributes named like kvpress's), loading kvpress once; raises KvpressUnavailable."""
    global _KV, _UNAVAILABLE, KVPRESS_IMPORT_MODE
    if _KV is not None:
        return _KV
    if _UNAVAILABLE is not None:
        raise KvpressUnavailable(_UNAVAILABLE)
    try:
        try:
            version = importlib.metadata.version("kvpress")
        except importlib.metadata.PackageNotFoundError:
            raise KvpressUnavailable(f"kvpress is not installed (pip install --no-deps kvpress=={KVPRESS_VERSION})")
        if version != KVPRESS_VERSION:
            raise KvpressUnavailable(f"kvpress {version} is installed; the reference is pinned to {KVPRESS_VERSION}")
        spec = importlib.util.find_spec("kvpress")
        loaded = sys.modules.get("kvpress")
        if loaded is not None and not getattr(loaded, "__kvpress_reference_bare__", False):
            KVPRESS_IMPORT_MODE = "package"
        else:
            try:
                importlib.import_module("kvpress")
                KVPRESS_IMPORT_MODE = "package"
            except ImportError as e:  # ModuleNotFoundError: cachetools / datasets / fire with --no-deps
                _load_bare(spec)
                KVPRESS_IMPORT_MODE = f"bare (import kvpress failed: {type(e).__name__}: {e})"
        ns = {}
        for mod, cls in (*_SCORERS.values(), *_WRAPPERS.values(), *_OTHERS.values()):
            ns[cls] = getattr(importlib.import_module(f"kvpress.presses.{mod}"), cls)
        ns["ScorerPress"] = importlib.import_module("kvpress.presses.scorer_press").ScorerPress
        ns["BasePress"] = importlib.import_module("kvpress.presses.base_press").BasePress
        if getattr(sys.modules["kvpress"], "__kvpress_reference_bare__", False):
            for k, v in ns.items():  # so that `from kvpress import KnormPress` works for these
                setattr(sys.modules["kvpress"], k, v)
        _KV = types.SimpleNamespace(version=version, **ns)
        return _KV
    except KvpressUnavailable as e:
        _UNAVAILABLE = str(e)
        raise
    except Exception as e:  # an API of transformers that kvpress imports is gone, ...
        _UNAVAILABLE = f"kvpress {KVPRESS_VERSION} cannot be loaded: {type(e).__name__}: {e}"
        raise KvpressUnavailable(_UNAVAILABLE) from e


def kvpress_unavailable_reason() -> str | None:
    try:
        load_kvpress()
        return None
    except KvpressUnavailable as e:
        return str(e)


def require_kvpress() -> types.SimpleNamespace:
    """load_kvpress(), or pytest.skip with the reason."""
    try:
        return load_kvpress()
    except KvpressUnavailable as e:
        import pytest

        pytest.skip(str(e))


# ------------------------------------------------------------------------------------------------ presses
def _split_name(press_name: str, inner: str | None):
    name = press_name.strip().lower()
    if "(" in name:
        if not name.endswith(")"):
            raise ValueError(f"bad press name {press_name!r}")
        name, inner2 = name[:-1].split("(", 1)
        if inner is not None and inner != inner2:
            raise ValueError(f"inner press given twice: {press_name!r} and inner={inner!r}")
        inner = inner2
    return name, inner


def make_press(press_name: str, compression_ratio: float, inner: str | None = None,
               inner_kwargs: dict | None = None, **press_kwargs):
    """A kvpress press object: make_press("adakv", 0.5, inner="snapkv", alpha_safeguard=0.2)."""
    kv = load_kvpress()
    name, inner = _split_name(press_name, inner)
    if name in _SCORERS:
        if inner is not None:
            raise ValueError(f"{name} takes no inner press")
        return getattr(kv, _SCORERS[name][1])(compression_ratio=compression_ratio, **press_kwargs)
    if name in _WRAPPERS:
        if inner is None:
            raise ValueError(f"{name} wraps a scorer press: pass inner=one of {tuple(_SCORERS)}")
        if inner not in _SCORERS:
            raise ValueError(f"inner press must be one of {tuple(_SCORERS)}, not {inner!r}")
        inner_press = getattr(kv, _SCORERS[inner][1])(compression_ratio=compression_ratio, **(inner_kwargs or {}))
        return getattr(kv, _WRAPPERS[name][1])(press=inner_press, **press_kwargs)
    if name in _OTHERS:
        if inner is not None:
            raise ValueError(f"{name} takes no inner press")
        return getattr(kv, _OTHERS[name][1])(compression_ratio=compression_ratio, **press_kwargs)
    raise ValueError(f"unknown press {press_name!r}; one of {PRESS_NAMES}")


# -------------------------------------------------------------------------------------------- the model
def _as_ids(hf_model, input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [T] or [1, T] (kvpress scores batch size 1), got {tuple(ids.shape)}")
    return ids.to(hf_model.device)


def _base(hf_model):
    return hf_model.model.language_model if hasattr(hf_model.model, "language_model") else hf_model.model


def _new_cache(hf_model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=hf_model.config)
    except TypeError:
        return DynamicCache()


def _cache_kwarg(fn) -> str:
    """transformers >= 5.2x calls the cache argument `cache` (with `past_key_values` deprecated)."""
    try:
        return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


@dataclass
class PrefillCapture:
    """One plain prefill of the reference model: per layer what kvpress's hook would see."""
    input_ids: torch.Tensor
    hidden_states: list  # [1, T, hidden] input of self_attn (after input_layernorm)
    keys: list  # [1, H, T, d] after RoPE (the DynamicCache's)
    values: list  # [1, H, T, d]
    position_embeddings: list  # (cos, sin), [1, T, d] each
    attention_masks: list  # as passed to self_attn (None under sdpa without padding)
    cache: object


_LAST_CAPTURE: tuple | None = None  # (weakref(model), ids tuple, PrefillCapture): several presses, one prompt


@torch.no_grad()
def capture_prefill(hf_model, input_ids) -> PrefillCapture:
    global _LAST_CAPTURE
    ids = _as_ids(hf_model, input_ids)
    key = tuple(ids[0].tolist())
    if _LAST_CAPTURE is not None and _LAST_CAPTURE[0]() is hf_model and _LAST_CAPTURE[1] == key:
        return _LAST_CAPTURE[2]
    layers = _base(hf_model).layers
    seen = {}

    def pre_hook(module, args, kwargs):
        hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen[module.layer_idx] = (hs, kwargs.get("position_embeddings"), kwargs.get("attention_mask"))

    hooks = [layer.self_attn.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers]
    cache = _new_cache(hf_model)
    try:
        base = _base(hf_model)
        base(input_ids=ids, use_cache=True, **{_cache_kwarg(base.forward): cache})
    finally:
        for h in hooks:
            h.remove()
    n = len(layers)
    cap = PrefillCapture(
        input_ids=ids,
        hidden_states=[seen[i][0] for i in range(n)],
        keys=[cache.layers[i].keys for i in range(n)],
        values=[cache.layers[i].values for i in range(n)],
        position_embeddings=[seen[i][1] for i in range(n)],
        attention_masks=[seen[i][2] for i in range(n)],
        cache=cache,
    )
    _LAST_CAPTURE = (weakref.ref(hf_model), key, cap)
    return cap


@contextmanager
def _temporary_attrs(objs, name, value_fn):
    """Set obj.<name> on each obj (e.g. self_attn.rotary_emb, as kvpress's __call__ does) and undo it after."""
    before = []
    for o in objs:
        before.append((o, name in o.__dict__ or name in getattr(o, "_modules", {}), getattr(o, name, None)))
        setattr(o, name, value_fn(o))
    try:
        yield
    finally:
        for o, had, old in before:
            if had:
                setattr(o, name, old)
            elif hasattr(o, name):
                delattr(o, name)


def _pop_masked_key_indices(module):
    idx = getattr(module, "masked_key_indices", None)
    if "masked_key_indices" in module.__dict__:
        del module.__dict__["masked_key_indices"]
    return idx


# ---------------------------------------------------------------------------------------- reading back
def _row_bytes(t: torch.Tensor):
    """[H, N, d] -> per head a list of N byte strings (exact bit patterns of each row)."""
    t = t.detach().to("cpu").contiguous()
    b = t.view(torch.uint8).reshape(t.shape[0], t.shape[1], -1).numpy()
    return [[row.tobytes() for row in head] for head in b]


def _surviving_positions(keys, values, new_keys, new_values) -> torch.Tensor:
    """Which positions of keys [1, H, T, d] survive in new_keys [1, H, n, d]: mask [H, T] (rows matched exactly)."""
    H, T = keys.shape[1], keys.shape[2]
    if new_keys.shape[:2] != keys.shape[:2] or new_keys.shape[2] > T:
        raise AssertionError(f"compressed keys {tuple(new_keys.shape)} do not fit {tuple(keys.shape)}")
    old_k, new_k = _row_bytes(keys[0]), _row_bytes(new_keys[0])
    old_v, new_v = _row_bytes(values[0]), _row_bytes(new_values[0])
    mask = torch.zeros(H, T, dtype=torch.bool)
    for h in range(H):
        where = {}
        for t, r in enumerate(old_k[h]):
            if r in where:
                raise AssertionError(f"head {h}: key rows {where[r]} and {t} are identical, the keep-set is ambiguous")
            where[r] = t
        for j, r in enumerate(new_k[h]):
            t = where.get(r)
            if t is None:
                raise AssertionError(f"head {h}: compressed key row {j} is no prompt key row (not a pure selection)")
            if new_v[h][j] != old_v[h][t]:
                raise AssertionError(f"head {h}: key row of position {t} kept with another position's value")
            if mask[h, t]:
                raise AssertionError(f"head {h}: position {t} kept twice")
            mask[h, t] = True
    return mask


def _mask_from_indices(masked_key_indices, H, T) -> torch.Tensor:
    mask = torch.ones(H, T, dtype=torch.bool)
    if masked_key_indices is None:
        return mask
    b, h, s = (x.to("cpu").long() for x in masked_key_indices)
    if (b != 0).any():
        raise AssertionError("batch size 1 expected")
    mask[h, s] = False
    return mask


def _scorer_recorders(press, kv):
    """Wrap `score` of the press and of its inner press to record (a copy of) what compress uses."""
    rec = {"outer": [], "inner": []}
    targets = []
    if isinstance(press, kv.ScorerPress):
        targets.append(("outer", press))
    inner = getattr(press, "press", None)
    if inner is not None and isinstance(inner, kv.ScorerPress):
        targets.append(("inner", inner))
    for slot, obj in targets:
        orig = obj.score

        def recording(*args, _orig=orig, _slot=slot, **kwargs):
            out = _orig(*args, **kwargs)
            rec[_slot].append(out.detach().clone())  # clone: AdaKV scatters into the scores in place
            return out

        obj.score = recording
    return rec, [obj for _, obj in targets]


def _unwrap(objs, name):
    for o in objs:
        o.__dict__.pop(name, None)


# ------------------------------------------------------------------------------------------------ result
@dataclass
class KvpressResult:
    press_name: str
    press: object
    route: str
    T: int
    masks: list  # per layer BoolTensor [H, T]: True = kept
    scores: list | None  # per layer FloatTensor [H, T] (see module doc), None where the press has none
    inner_scores: list | None = None  # wrappers: the inner press's scores
    notes: list = field(default_factory=list)

    @property
    def headwise(self) -> bool:
        counts = {int(c) for m in self.masks for c in m.sum(-1)}
        return len(counts) > 1 or self.press_name.split("(")[0] in HEADWISE

    def keep_sets(self):
        """Per layer LongTensor [H, n_kept] (sorted positions), or for head-wise presses a list of [n_kept_h]."""
        out = []
        for m in self.masks:
            rows = [torch.nonzero(r).flatten() for r in m]
            if self.headwise:
                out.append(rows)
            else:
                out.append(torch.stack(rows))
        return out


def _direct(hf_model, ids, press, kv, name) -> KvpressResult:
    cap = capture_prefill(hf_model, ids)
    T = ids.shape[1]
    layers = _base(hf_model).layers
    attn = [layer.self_attn for layer in layers]
    rotary = _base(hf_model).rotary_emb
    rec, wrapped = _scorer_recorders(press, kv)
    masks = []
    try:
        press.post_init_from_model(hf_model)
        with torch.no_grad(), _temporary_attrs(attn, "rotary_emb", lambda m: rotary):
            for i, module in enumerate(attn):
                kwargs = {
                    "hidden_states": cap.hidden_states[i],
                    "position_embeddings": cap.position_embeddings[i],
                    "attention_mask": cap.attention_masks[i],
                    "past_key_values": cap.cache,
                    "cache": cap.cache,
                    "cache_position": torch.arange(T, device=ids.device),
                    "position_ids": torch.arange(T, device=ids.device)[None],
                }
                keys, values = cap.keys[i], cap.values[i]
                _pop_masked_key_indices(module)
                new_k, new_v = press.compress(module, cap.hidden_states[i], keys, values, None, kwargs)
                mki = _pop_masked_key_indices(module)
                if mki is not None:  # head-wise press: nothing removed, the masked rows are recorded
                    if new_k.shape != keys.shape:
                        raise AssertionError("head-wise press both masked and removed rows")
                    masks.append(_mask_from_indices(mki, keys.shape[1], T))
                else:
                    masks.append(_surviving_positions(keys, values, new_k, new_v))
    finally:
        _unwrap(wrapped, "score")
    return _result(name, press, "direct", T, masks, rec)


def _result(name, press, route, T, masks, rec):
    outer = [s[0].float().cpu() for s in rec["outer"]] or None
    inner = [s[0].float().cpu() for s in rec["inner"]] or None
    scores = outer if outer is not None else inner
    return KvpressResult(name, press, route, T, masks, scores, inner if outer is not None else None)


def _adapt_hook_kwargs(module, kwargs):
    """transformers >= 5.2x: the attention layer gets `cache` (no `past_key_values`) and no `cache_position`."""
    if kwargs.get("past_key_values") is None:
        cache = kwargs.get("cache", kwargs.get("past_key_value"))
        if cache is not None:
            kwargs = {**kwargs, "past_key_values": cache}
    if "cache_position" not in kwargs and kwargs.get("past_key_values") is not None:
        q_len = kwargs["hidden_states"].shape[1]
        n = kwargs["past_key_values"].layers[module.layer_idx].keys.shape[2]
        kwargs = {**kwargs, "cache_position": torch.arange(n - q_len, n, device=kwargs["hidden_states"].device)}
    return kwargs


def _hook(hf_model, ids, press, kv, name, tokenizer_dir=None) -> KvpressResult:
    T = ids.shape[1]
    base = _base(hf_model)
    attn = [layer.self_attn for layer in base.layers]
    before = {}
    added = set()
    orig_hook = press.forward_hook

    def adapted(module, args, kwargs, output):
        new = _adapt_hook_kwargs(module, kwargs)
        added.update(k for k in new if k not in kwargs or (kwargs[k] is None and new[k] is not None))
        kwargs = new
        layer_cache = kwargs["past_key_values"].layers[module.layer_idx]
        before.setdefault(module.layer_idx, (layer_cache.keys, layer_cache.values))
        return orig_hook(module, args, kwargs, output)

    press.forward_hook = adapted
    rec, wrapped = _scorer_recorders(press, kv)
    cache = _new_cache(hf_model)
    is_kvzip = isinstance(press, kv.KVzipPress)
    kvzip_scores = []
    name_or_path = hf_model.config.name_or_path
    if is_kvzip:
        orig_post = press.compress_post

        def compress_post(model):
            kvzip_scores.append(press.score_val.detach().clone())
            return orig_post(model)

        press.compress_post = compress_post
        tok = Path(tokenizer_dir) if tokenizer_dir else SMOL_DIR
        if not (tok / "tokenizer.json").exists():
            raise FileNotFoundError(f"KVzip re-loads the tokenizer from a folder: {tok} has no tokenizer.json")
        hf_model.config.name_or_path = str(tok)
    had_rotary = [("rotary_emb" in m._modules) for m in attn]
    had_forward = "forward" in base.__dict__  # KVzip's __call__ "restores" base.forward as an instance attribute
    try:
        with torch.no_grad():
            for m in attn:
                _pop_masked_key_indices(m)
            with press(hf_model):
                if is_kvzip:  # its wrapped LlamaModel.forward reads kwargs["input_ids"], kwargs["past_key_values"]
                    base(input_ids=ids, past_key_values=cache)
                else:
                    hf_model(input_ids=ids, use_cache=True, **{_cache_kwarg(hf_model.forward): cache})
        masks = []
        for i, m in enumerate(attn):
            mki = _pop_masked_key_indices(m)
            layer = cache.layers[i]
            if mki is not None:
                masks.append(_mask_from_indices(mki, layer.keys.shape[1], T))
                if layer.keys.shape[2] != T:
                    raise AssertionError(f"layer {i}: head-wise press left {layer.keys.shape[2]} rows, not {T}")
            else:
                k, v = before[i]
                masks.append(_surviving_positions(k, v, layer.keys, layer.values))
    finally:
        hf_model.config.name_or_path = name_or_path
        if not had_forward:
            base.__dict__.pop("forward", None)
        _unwrap([press], "forward_hook")
        _unwrap([press], "compress_post")
        _unwrap(wrapped, "score")
        for m, had in zip(attn, had_rotary):
            if not had and "rotary_emb" in m._modules:
                del m._modules["rotary_emb"]
            _pop_masked_key_indices(m)
    res = _result(name, press, "hook", T, masks, rec)
    res.notes.append("hook kwargs added for this transformers: " + (", ".join(sorted(added)) or "none"))
    if is_kvzip:
        res.scores = [s[0].float().cpu() for s in kvzip_scores[0]]
        res.notes.append(f"kvzip: positions < prefix_length={_kvzip_prefix_length(tok)} (its chat-template prefix) "
                         "are never scored (score 0; sinks excepted)")
    return res


def _kvzip_prefix_length(tok_dir) -> int:
    """The prefix length KVzip derives from the chat template (recomputed for the note only)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    if tokenizer.chat_template is None:
        return 0
    dummy = "dummy context"
    sep = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + sep}], add_generation_prompt=True,
                                         tokenize=False, enable_thinking=False)
    prefix = text.split(sep)[0].split(dummy)[0]
    return len(tokenizer.encode(prefix, add_special_tokens=False))


def kvpress_reference(hf_model, input_ids, press_name: str, compression_ratio: float, *, inner: str | None = None,
                      inner_kwargs: dict | None = None, route: str | None = None, tokenizer_dir=None,
                      **press_kwargs) -> KvpressResult:
    """Run kvpress's press on the reference model's prefill of input_ids; see the module docstring."""
    kv = load_kvpress()
    name, inner = _split_name(press_name, inner)
    press = make_press(name, compression_ratio, inner=inner, inner_kwargs=inner_kwargs, **press_kwargs)
    label = f"{name}({inner})" if inner else name
    ids = _as_ids(hf_model, input_ids)
    if route is None:
        route = "hook" if name == "kvzip" else "direct"
    if route == "direct":
        if name == "kvzip":
            raise ValueError("kvzip needs forward passes (context reconstruction): route='hook' only")
        return _direct(hf_model, ids, press, kv, label)
    if route == "hook":
        return _hook(hf_model, ids, press, kv, label, tokenizer_dir=tokenizer_dir)
    raise ValueError(f"route must be 'direct' or 'hook', not {route!r}")


def kvpress_keep_masks(hf_model, input_ids, press_name, compression_ratio, **kw) -> list:
    """Per layer BoolTensor [n_kv_heads, T]: True where kvpress keeps the prompt position in that KV head."""
    return kvpress_reference(hf_model, input_ids, press_name, compression_ratio, **kw).masks


def kvpress_keep_sets(hf_model, input_ids, press_name, compression_ratio, **kw) -> list:
    """Per layer LongTensor [n_kv_heads, n_kept] of sorted kept positions (head-wise presses: list of [n_kept_h])."""
    return kvpress_reference(hf_model, input_ids, press_name, compression_ratio, **kw).keep_sets()


def kvpress_scores(hf_model, input_ids, press_name, compression_ratio, **kw) -> list | None:
    """Per layer FloatTensor [n_kv_heads, T] of the press's scores (higher = kept first); see the module doc."""
    return kvpress_reference(hf_model, input_ids, press_name, compression_ratio, **kw).scores
