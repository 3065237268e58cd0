"""The registry of cache policies and how caches are set up, from the command line, a YAML config or Python.

    import policies
    policies.setup(model, cache_strategy="lsh", max_cache_length=0.5, lsh_dim=8, max_seq_length=1024)

POLICIES names every policy class (adding a policy = one class, one line here, one reference in
tests/reference_policies.py). Options come from declarations, so the --flags, the YAML keys of cache_configs/
and the keyword arguments of setup() are the same names, checked the same way:
  - the set-up options below (SETUP_OPTIONS: which policy per layer, the budget per layer);
  - the engine's knobs shared by every policy (cache.CACHE_PARAMS);
  - each policy's own hyper-parameters (its `hyperparams`; a flag left unset lets each policy use its default).
setup() also installs what a policy needs from the tokenizer (FastGen's token classes), so no entry point does.
"""
import argparse
from pathlib import Path

import torch
import yaml

from cache import (CACHE_PARAMS, KVZIP_INSTRUCTION, KVZIP_MAX_INSTRUCTION, ExpectedAttentionCache, FullCache,
                   HeavyHitterCache, KeepItOddCache, KeyDiffCache, L2Cache, LSHCache, Param, RandomCache,
                   RecentGlobalCache, SinkRecentCache, TOVACache)
from cli import one_line_errors
from hybrid import HybridCache, token_class_tables
from lacache import LaCache
from merge_pyramid import MergePyramidCache
from quantize import dense_weight

CONFIG_DIR = Path(__file__).resolve().parent / "cache_configs"

POLICIES = {
    "full": FullCache,
    "random": RandomCache,
    "recent_global": RecentGlobalCache,
    "l2": L2Cache,
    "heavy_hitter": HeavyHitterCache,
    "keep_it_odd": KeepItOddCache,
    "lsh": LSHCache,
    "sink_recent": SinkRecentCache,
    "hybrid": HybridCache,
    "lacache": LaCache,
    "merge_pyramid": MergePyramidCache,
    "keydiff": KeyDiffCache,
    "tova": TOVACache,
    "expected_attention": ExpectedAttentionCache,
}

# Set-up options: which policy each layer gets and how many slots.
SETUP_OPTIONS = {
    "cache_strategy": (["full"], "one or more policies, laid over the layers by --cache_strategy_pattern"),
    "cache_strategy_pattern": (Param(str, "tile", "how several strategies are laid over the layers: tile a..ab..b, "
                                                  "repeat abab", choices=("tile", "repeat")), None),
    "max_cache_length": ([1.0], "slots per layer: a fraction (<= 1) of prompt + max_new_tokens, or a token count"),
    "compression_ratio": (Param(float, None, "kvpress's budget: the fraction of the PROMPT removed, so each layer keeps "
                                             "int(prompt tokens x (1 - ratio)) slots (eval.py: of --seq_length); "
                                             "replaces --max_cache_length", min=0, max=0.999), None),
    "budget_scope": (Param(str, "sequence", "what the budget binds: sequence (the cache never holds more than its "
                                            "budget; decoding evicts) or prompt (kvpress's layout: the prompt is "
                                            "compressed to the budget once, then every new token is kept)",
                           choices=("sequence", "prompt")), None),
    "cache_length_pattern": (Param(str, "tile", "how several lengths are laid over the layers; pyramid/funnel: "
                                                "PyramidKV's linear schedule",
                                   choices=("tile", "repeat", "pyramid", "funnel")), None),
    "pyramid_beta": (Param(float, 20.0, "pyramid/funnel steepness (PyramidKV's beta): the smallest layer gets "
                                        "average / beta", min=1), None),
    "feed_long_prompts": (Param(bool, False, "prefill budget-1 prompt tokens, then feed the rest through the decode "
                                             "step"), None),
    "prefill_chunk": (Param(int, 0, "prefill the prompt N tokens at a time, compressing the caches after each chunk "
                                    "(the cache never holds more than its budget; 0: the whole prompt at once)", min=0),
                      None),
}


def policy_params() -> dict:
    """Every policy hyper-parameter by name (a name shared by two policies is one flag; first declaration)."""
    out = {}
    for cls in POLICIES.values():
        for name, p in cls.hyperparams.items():
            out.setdefault(name, p)
    return out


def option_names() -> set:
    return set(SETUP_OPTIONS) | set(CACHE_PARAMS) | set(policy_params())


# ---------------------------------------------------------------------------------------------------------------
# Options from Python (keyword arguments or a mapping), argparse or YAML: one normalised dict
# ---------------------------------------------------------------------------------------------------------------
def settings(config=None, **options) -> dict:
    """All cache options, defaults filled in: from `config` (a mapping, or an argparse Namespace whose other
    attributes are ignored) updated by keyword options. Policy hyper-parameters left unset stay None (each
    policy's own default applies)."""
    given = {}
    if isinstance(config, argparse.Namespace):
        given.update({k: v for k, v in vars(config).items() if k in option_names()})
    elif config is not None:
        given.update(config)
    given.update(options)
    unknown = sorted(set(given) - option_names())
    if unknown:
        raise ValueError(f"unknown cache options {unknown}; known: {', '.join(sorted(option_names()))}")
    out = {}
    for name, (default, _) in SETUP_OPTIONS.items():
        value = given.get(name)
        if isinstance(default, Param):
            out[name] = default.check(name, default.default if value is None else value)
        else:
            value = default if value is None else value
            out[name] = list(value) if isinstance(value, (list, tuple)) else [value]
    for name, p in CACHE_PARAMS.items():
        out[name] = p.check(name, given[name] if given.get(name) is not None else p.default)
    for name, p in policy_params().items():
        out[name] = None if given.get(name) is None else p.check(name, given[name])
    return out


def add_cache_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("KV cache (see cache_configs/ and docs/algorithms.md)")
    g.add_argument("--cache_config", default=None,
                   help="load cache_configs/NAME.yaml (or a .yaml path); flags given on the command line override it")
    g.add_argument("--cache_strategy", nargs="+", default=["full"], help=f"one or more of: {', '.join(POLICIES)}")
    g.add_argument("--max_cache_length", nargs="+", type=budget_value, default=[1.0],
                   help=SETUP_OPTIONS["max_cache_length"][1])
    for name, (param, _) in SETUP_OPTIONS.items():
        if isinstance(param, Param):
            add_param_flag(g, name, param, param.default)
    for name, param in CACHE_PARAMS.items():
        add_param_flag(g, name, param, param.default)
    defaults = {}  # a name two policies share may have a default per policy (its help says which)
    for cls in POLICIES.values():
        for name, p in cls.hyperparams.items():
            defaults.setdefault(name, set()).add(p.default)
    for name, param in policy_params().items():  # unset (None): each policy uses its own default
        add_param_flag(g, name, param, None, help_default=len(defaults[name]) == 1)


def add_param_flag(g, name: str, param: Param, default, help_default: bool = False):
    help_ = param.help + (f" (default {param.default})" if help_default and param.type is not bool else "")
    if param.type is bool:  # --name / --no-name, so a default of True can be turned off
        g.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default, help=help_)
        return

    def parse(text):
        try:
            value = param.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if param.type is int else 'a number'}, "
                                             f"got {text!r}")
        why = param.problem(value)
        if why:
            raise argparse.ArgumentTypeError(why)
        return value

    parse.__name__ = param.type.__name__
    g.add_argument(f"--{name}", type=parse, default=default, help=help_)


def budget_problem(x):
    """Why x is not a --max_cache_length value (a fraction in (0, 1] or a whole number of tokens), or None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not (0 < x < float("inf")) or (x > 1 and x != int(x)):
        return f"must be a fraction in (0, 1] or a whole number of tokens, got {x!r}"
    return None


def budget_value(text: str) -> float:
    """argparse type of --max_cache_length."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}")
    why = budget_problem(x)
    if why:
        raise argparse.ArgumentTypeError(why)
    return x


def parse_args(parser, argv=None):
    """parse_args with --cache_config: the YAML's values become defaults, so command-line flags override them."""
    one_line_errors(parser)
    pre, _ = parser.parse_known_args(argv)
    if getattr(pre, "cache_config", None):
        parser.set_defaults(**read_config(pre.cache_config, parser))
    return parser.parse_args(argv)


def read_config(name: str, parser=None) -> dict:
    """A cache_configs/ YAML (by name, or a path) as option values, checked as the command line checks them."""
    path = Path(name)
    if not path.suffix:
        path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ValueError(f"unknown --cache_config {name!r}; shipped configs: {known}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(values, dict):
        raise ValueError(f"{path} must be a mapping of option: value")
    if parser is None:
        parser = argparse.ArgumentParser()
        add_cache_args(parser)
    actions = {a.dest: a for a in parser._actions}
    bad = sorted(set(values) - set(actions))
    if bad:
        raise ValueError(f"{path}: unknown keys {bad}")
    for key, value in values.items():  # the same type checks as on the command line
        typ = actions[key].type
        if typ is None or value is None:
            continue
        try:
            values[key] = [typ(str(x)) for x in value] if isinstance(value, list) else typ(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise ValueError(f"{path}: {key}: {value!r} is not valid ({e})")
        if isinstance(value, list) and actions[key].nargs is None:
            raise ValueError(f"{path}: {key} takes one value, got a list")
    for key in ("cache_strategy", "max_cache_length"):
        if key in values and not isinstance(values[key], list):
            values[key] = [values[key]]
    return values


# ---------------------------------------------------------------------------------------------------------------
# Building caches
# ---------------------------------------------------------------------------------------------------------------
def layer_pattern(values: list, n_layers: int, pattern: str, what: str) -> list:
    if n_layers % len(values):
        raise ValueError(f"{len(values)} values of {what} do not divide the model's {n_layers} layers")
    if pattern == "repeat":
        return [values[i % len(values)] for i in range(n_layers)]
    per = n_layers // len(values)
    return [values[i // per] for i in range(n_layers)]


def layer_budgets(cfg: dict, n_layers: int, max_seq_length: int, prompt_len: int = 0) -> list:
    """Slots per layer from max_cache_length (or compression_ratio and the prompt length) and cache_length_pattern,
    each capped at max_seq_length."""
    def tokens(x):
        return int(round(x * max_seq_length)) if x <= 1 else int(x)

    if cfg["compression_ratio"] is not None:
        if prompt_len < 1:
            raise ValueError("--compression_ratio is a share of the prompt: the prompt length must be known")
        lengths = [max(1, int(prompt_len * (1 - cfg["compression_ratio"])))]
    else:
        for x in cfg["max_cache_length"]:
            if budget_problem(x):
                raise ValueError(f"--max_cache_length {budget_problem(x)}")
        lengths = [tokens(x) for x in cfg["max_cache_length"]]
    if any(x < 1 for x in lengths):
        raise ValueError(f"--max_cache_length {cfg['max_cache_length']} gives an empty cache")
    pattern = cfg["cache_length_pattern"]
    if pattern in ("pyramid", "funnel"):
        if len(lengths) != 1:
            raise ValueError("--cache_length_pattern pyramid/funnel takes one --max_cache_length (the average)")
        avg = lengths[0]
        low = avg / cfg["pyramid_beta"]  # PyramidKV: linear from 2*avg - low (layer 0) down to low
        high = 2 * avg - low
        step = (high - low) / max(n_layers - 1, 1)
        budgets = [int(round(high - i * step)) for i in range(n_layers)]
        if pattern == "funnel":
            budgets = budgets[::-1]
    else:
        budgets = layer_pattern(lengths, n_layers, pattern, "--max_cache_length")
    return [min(b, max_seq_length) for b in budgets]


def build_caches(cfg: dict, n_layers: int, n_kv_heads: int, head_dim: int, batch_size: int, max_seq_length: int,
                 dtype, device, prompt_len: int = 0, n_heads: int = None) -> list:
    """One cache module per layer from settings() (validated: one clear error per mistake)."""
    cfg = settings(cfg)
    strategies = layer_pattern(cfg["cache_strategy"], n_layers, cfg["cache_strategy_pattern"], "--cache_strategy")
    for s in set(strategies):
        if s not in POLICIES:
            raise ValueError(f"unknown --cache_strategy {s!r}; allowed: {', '.join(POLICIES)}")
    if cfg["feed_long_prompts"] and (cfg["prompt_compression_strategy"] is not None or cfg["prefill_chunk"]):
        raise ValueError("--feed_long_prompts feeds a long prompt through the decode step; it excludes "
                         "--prompt_compression_strategy and --prefill_chunk")
    if cfg["keep_set"] != "topk" and all(POLICIES[s].never_evicts for s in strategies):
        raise ValueError(f"--keep_set {cfg['keep_set']} chooses what a compressing policy keeps; "
                         f"{', '.join(sorted(set(strategies)))} keeps everything")
    budgets = layer_budgets(cfg, n_layers, max_seq_length, prompt_len)
    decode_room = 0
    if cfg["budget_scope"] == "prompt":
        if prompt_len < 1:
            raise ValueError("--budget_scope prompt sizes the caches for the new tokens: the prompt length must be "
                             "known")
        if cfg["feed_long_prompts"]:
            raise ValueError("--budget_scope prompt keeps every token after the prompt; it excludes "
                             "--feed_long_prompts (which feeds the prompt's tail through the decode step)")
        own_rule = sorted({s for s in strategies if POLICIES[s].own_prompt_rule})
        if own_rule:
            raise ValueError(f"--budget_scope prompt: {', '.join(own_rule)} keep(s) the prompt by their own rule, "
                             "not by compressing it to a budget; use --budget_scope sequence")
        decode_room = max(0, max_seq_length - prompt_len)
    budget_given = cfg["compression_ratio"] is not None or cfg["max_cache_length"] != [1.0]
    engine = {name: cfg[name] for name in CACHE_PARAMS}
    caches = []
    for i, (strategy, budget) in enumerate(zip(strategies, budgets)):
        cls = POLICIES[strategy]
        hp = {name: cfg[name] for name in cls.hyperparams if cfg[name] is not None}
        if cls is FullCache:
            budget = max_seq_length
        elif hasattr(cls, "sized_budget"):  # policies whose own flags set the budget
            if budget_given and not any(n in hp for n in cls.size_flags):  # one budget flag for every policy
                hp.update(cls.size_for_budget(budget))
            budget = cls.sized_budget(prompt_len, max_seq_length,
                                      {n: hp.get(n, p.default) for n, p in cls.hyperparams.items()})
        elif budget < max_seq_length and budget < cfg["global_tokens"] + cfg["recent_window"] + 1:
            raise ValueError(f"layer {i} gets a budget of {budget} slots, smaller than --global_tokens "
                             f"({cfg['global_tokens']}) + --recent_window ({cfg['recent_window']}) + 1")
        with torch.device(device):
            caches.append(cls(batch_size, n_kv_heads, head_dim, budget, dtype, max_seq_length=max_seq_length,
                              layer_idx=i, n_layers=n_layers, n_heads=n_heads,
                              decode_room=0 if cls is FullCache else decode_room, **engine, **hp))
    return caches


def install(model, caches: list, max_seq_length: int, tokenizer=None):
    """Installs one cache per layer (built by build_caches) in the model, with what the
    policies need from it: RoPE tables long enough for every policy (expected_attention looks past the sequence),
    each layer's output projection (--keep_set criticalkv) and the tokenizer's token classes (hybrid)."""
    mc = model.config
    model.setup_caches(max_seq_length, lambda i: caches[i],
                       rope_length=max_seq_length + max(c.rope_margin for c in caches))
    sharded = getattr(model, "tensor_parallel", None)  # tp.py: this process holds a share of every layer's heads
    for layer, c in zip(model.layers, caches):
        if c.keep_set == "criticalkv":
            c.set_output_projection(dense_weight(layer.attention.wo))
        if sharded:
            c.set_head_group(sharded["group"], sharded["world"], sharded["rank"])
    if tokenizer is not None:
        instruction = tokenizer.encode(KVZIP_INSTRUCTION)[:KVZIP_MAX_INSTRUCTION]
        for c in caches:
            c.kvzip_instruction = instruction
    token_caches = [c for c in caches if c.needs_tokens]
    if token_caches and tokenizer is not None:
        w = model.tok_embeddings.weight
        special, punct = (t.to(w.device) for t in token_class_tables(tokenizer, mc.vocab_size))
        for c in token_caches:
            c.set_token_tables(special, punct)


def setup(model, config=None, batch_size: int = 1, prompt_len: int = 0, max_seq_length: int = None, *,
          tokenizer=None, **options) -> list:
    """Builds each layer's cache and installs it in the model. config: a mapping or an argparse Namespace of cache
    options, updated by keyword options (see settings()). With batch_size > 1 each layer's cache holds the whole
    batch, every per-sequence buffer with the batch first (prompt_len: the longest prompt; policies whose buffer
    depends on it use it). tokenizer: for policies that classify tokens (hybrid); without it no token is special
    or punctuation."""
    if not max_seq_length or max_seq_length < 1:
        raise ValueError("setup needs max_seq_length: the longest sequence (prompt + new tokens) the caches must hold")
    cfg = settings(config, **options)
    mc = model.config
    w = model.tok_embeddings.weight

    caches = build_caches(cfg, mc.n_layer, mc.n_local_heads, mc.head_dim, batch_size, max_seq_length, w.dtype,
                          w.device, prompt_len=prompt_len, n_heads=mc.n_head)
    install(model, caches, max_seq_length, tokenizer)
    return caches
