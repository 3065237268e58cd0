"""Convert a Hugging Face Llama / Mistral / Qwen2 checkpoint folder (as written by scripts/download.py) into this
engine's checkpoint format, in place: model.pth + config.json (see model.py), fully offline.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/meta-llama/Llama-3.1-8B-Instruct

The HF config.json is kept as hf_config.json (renamed once; a re-run reads it from there, and a config.json that is
an HF config again, e.g. after a fresh download, takes precedence). Weights: *.safetensors (single or sharded) or,
when there are none, pytorch_model*.bin. RoPE: default, linear and llama3 scaling, from transformers 4.x
(`rope_theta` + `rope_scaling`) or 5.x (`rope_parameters`) configs. model.pth is written last, atomically.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model import ModelArgs  # noqa: E402

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE = ("default", "linear", "llama3")
_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Buffers some old checkpoints carry that the engine recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
    pass


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from None


def _is_hf_config(cfg) -> bool:
    return isinstance(cfg, dict) and "model_type" in cfg


def read_hf_config(folder: Path) -> dict:
    """The HF config: config.json while it is one (and then saved as hf_config.json), else hf_config.json."""
    cfg_path, saved = folder / "config.json", folder / "hf_config.json"
    if cfg_path.exists():
        cfg = _read_json(cfg_path)
        if _is_hf_config(cfg):
            if not saved.exists() or _read_json(saved) != cfg:
                tmp = folder / "hf_config.json.tmp"
                shutil.copyfile(cfg_path, tmp)
                tmp.replace(saved)
            return cfg
    if saved.exists():
        cfg = _read_json(saved)
        if _is_hf_config(cfg):
            return cfg
        raise ConversionError(f"{saved} has no model_type: not a Hugging Face config")
    if cfg_path.exists():
        raise ConversionError(f"{cfg_path} is not a Hugging Face config (no model_type) and there is no "
                              f"hf_config.json; download the model again")
    raise ConversionError(f"{folder} has no config.json (download it with scripts/download.py)")


def parse_rope(hf: dict) -> tuple[float, "dict | None"]:
    """(rope_base, rope_scaling) from a transformers 4.x (rope_theta + rope_scaling) or 5.x (rope_parameters) config.

    rope_scaling is None for plain RoPE, else an HF-style dict with a rope_type key (no rope_theta)."""
    params = hf.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ConversionError(f"rope_parameters {params!r} is not a dict")
        if "rope_type" not in params and "type" not in params and "rope_theta" not in params and params and \
                all(isinstance(v, dict) for v in params.values()):
            raise ConversionError(f"per-layer-type rope_parameters ({', '.join(params)}) are not supported")
        base = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = params
    else:
        base = hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling")
    if scaling is None:
        return float(base), None
    if not isinstance(scaling, dict):
        raise ConversionError(f"rope scaling {scaling!r} is not a dict")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_ROPE:
        raise ConversionError(f"rope type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE)})")
    partial = scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConversionError(f"partial_rotary_factor {partial} is not supported (full rotary only)")
    if kind == "default":
        return float(base), None
    missing = [k for k in _ROPE_KEYS[kind] if scaling.get(k) is None]
    if missing:
        raise ConversionError(f"rope type {kind!r} needs {', '.join(missing)} in the config")
    out = {"rope_type": kind}
    for k in _ROPE_KEYS[kind]:
        v = scaling[k]
        out[k] = int(v) if k == "original_max_position_embeddings" else float(v)
    return float(base), out


def _first(*values):
    for v in values:
        if v is not None:
            return v
    return None


def _as_list(v) -> list:
    if v is None:
        return []
    ids = [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
    return list(dict.fromkeys(ids))


def _tokenizer_info(folder: Path) -> dict:
    """What the tokenizer files say: chat template text, special token strings, add_bos (None when unsaid)."""
    info = {"template": "", "tokens": set(), "add_bos": None, "sentencepiece": (folder / "tokenizer.model").exists()
            or (folder / "original" / "tokenizer.model").exists()}
    templates = []
    tc_path = folder / "tokenizer_config.json"
    if tc_path.exists():
        tc = _read_json(tc_path)
        t = tc.get("chat_template")
        if isinstance(t, list):  # [{"name": ..., "template": ...}, ...]
            templates += [d.get("template", "") for d in t if isinstance(d, dict)]
        elif isinstance(t, str):
            templates.append(t)
        if isinstance(tc.get("add_bos_token"), bool):
            info["add_bos"] = tc["add_bos_token"]
        for d in (tc.get("added_tokens_decoder") or {}).values():
            if isinstance(d, dict) and "content" in d:
                info["tokens"].add(d["content"])
    if (folder / "chat_template.jinja").exists():
        templates.append((folder / "chat_template.jinja").read_text())
    if (folder / "chat_template.json").exists():
        t = _read_json(folder / "chat_template.json").get("chat_template")
        if isinstance(t, str):
            templates.append(t)
    info["template"] = "\n".join(templates)
    tj_path = folder / "tokenizer.json"
    if tj_path.exists():
        tj = _read_json(tj_path)
        for d in tj.get("added_tokens") or []:
            info["tokens"].add(d.get("content"))
        if info["add_bos"] is None:
            info["add_bos"] = _template_adds_bos(tj.get("post_processor"))
    return info


def _template_adds_bos(pp):
    """True/False when tokenizer.json's post-processor is a TemplateProcessing (does it start with a special token)."""
    if not isinstance(pp, dict):
        return None
    if pp.get("type") == "Sequence":
        for sub in pp.get("processors") or []:
            r = _template_adds_bos(sub)
            if r is not None:
                return r
        return None
    if pp.get("type") == "TemplateProcessing":
        single = pp.get("single") or []
        return bool(single) and "SpecialToken" in single[0]
    return None


def chat_and_bos(hf: dict, folder: Path, bos_id) -> tuple["str | None", bool]:
    arch = hf["model_type"]
    tok = _tokenizer_info(folder)
    text = tok["template"]
    llama3 = "<|start_header_id|>" in tok["tokens"] or "<|start_header_id|>" in text or \
        (arch == "llama" and bos_id == 128000)
    if llama3:
        chat = "llama3"
    elif arch == "qwen2" or "<|im_start|>" in text:
        chat = "chatml"
    elif "[INST]" in text:
        chat = "llama2"
    else:
        chat = None
    if tok["add_bos"] is not None:
        add_bos = tok["add_bos"]
    elif arch == "qwen2":
        add_bos = False
    else:
        add_bos = llama3 or tok["sentencepiece"]
    return chat, bool(add_bos)


def build_args(hf: dict, folder: Path) -> ModelArgs:
    arch = hf.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise ConversionError(f"model_type {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"hidden_act {act!r} is not supported (silu only)")
    if hf.get("mlp_bias"):
        raise ConversionError("mlp_bias = true is not supported")
    try:
        dim, n_head, n_layer = int(hf["hidden_size"]), int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
        vocab, inter = int(hf["vocab_size"]), int(hf["intermediate_size"])
    except KeyError as e:
        raise ConversionError(f"the HF config has no {e.args[0]!r}") from None
    n_kv = int(_first(hf.get("num_key_value_heads"), n_head))
    head_dim = int(_first(hf.get("head_dim"), dim // n_head))
    rope_base, rope_scaling = parse_rope(hf)
    block_size = int(_first(hf.get("max_position_embeddings"), 4096))
    # Sliding-window attention is not implemented: the engine is exact up to the window, so cap the context there.
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", True) if arch == "qwen2" else True
    if uses_window and window and int(window) < block_size:
        print(f"warning: sliding_window {window} < max_position_embeddings {block_size}: the engine uses full "
              f"attention, so block_size is capped at {window}", file=sys.stderr)
        block_size = int(window)
    attention_bias = bool(hf.get("attention_bias", arch == "qwen2"))
    gen_path = folder / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.exists() else {}
    eos_ids = _as_list(_first(gen.get("eos_token_id"), hf.get("eos_token_id")))
    bos = _first(gen.get("bos_token_id"), hf.get("bos_token_id"))
    bos_id = None if bos is None else _as_list(bos)[0]
    chat_format, add_bos = chat_and_bos(hf, folder, bos_id)
    return ModelArgs(
        name=folder.resolve().name, arch=arch, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_local_heads=n_kv,
        dim=dim, intermediate_size=inter, head_dim=head_dim, rope_base=rope_base, rope_scaling=rope_scaling,
        norm_eps=float(_first(hf.get("rms_norm_eps"), 1e-6)), block_size=block_size, attention_bias=attention_bias,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), bos_id=bos_id, eos_ids=eos_ids,
        chat_format=chat_format, add_bos=add_bos)


def weight_files(folder: Path) -> list[Path]:
    """The HF weight files: safetensors (the index's shards, or every model*.safetensors), else pytorch_model*.bin."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = folder / index_name
        if index.exists():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise ConversionError(f"{index} lists shards that are missing: {', '.join(missing[:3])}")
            return [folder / s for s in shards]
        files = sorted(p for p in folder.glob(pattern) if not p.name.startswith(("consolidated", "adapter")))
        if files:
            return files
    raise ConversionError(f"{folder} has no weights (*.safetensors or pytorch_model*.bin)")


def load_weights(files: list[Path], dtype) -> dict:
    sd = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(f), framework="pt") as g:
                part = {k: g.get_tensor(k) for k in g.keys()}
        else:
            try:
                part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
                part = torch.load(f, map_location="cpu", weights_only=True)
            if "state_dict" in part and isinstance(part["state_dict"], dict):
                part = part["state_dict"]
        for k, v in part.items():
            if not isinstance(v, torch.Tensor):
                raise ConversionError(f"{f}: entry {k!r} is not a tensor")
            sd[k] = v.to(dtype) if v.is_floating_point() and dtype is not None else v
    return sd


def map_state_dict(hf_sd: dict, args: ModelArgs) -> dict:
    """HF names -> ours (q/k/v fused into wqkv, q rows then k then v; HF rotate-half order kept)."""
    sd = hf_sd
    for k in [k for k in sd if k.endswith(_IGNORED_SUFFIXES)]:
        del sd[k]
    prefix = "model." if "model.embed_tokens.weight" in sd else ""

    def take(name, shape, optional=False):
        key = prefix + name if not name.startswith("lm_head") else name
        if key not in sd:
            if optional:
                return None
            raise ConversionError(f"the checkpoint has no {key}")
        t = sd.pop(key)  # popped: the HF tensors are freed as ours are built
        if tuple(t.shape) != tuple(shape):
            raise ConversionError(f"{key} has shape {tuple(t.shape)}, the config implies {tuple(shape)}")
        return t

    D, hd, nh, nkv = args.dim, args.head_dim, args.n_head, args.n_local_heads
    out = {"tok_embeddings.weight": take("embed_tokens.weight", (args.vocab_size, D)),
           "norm.weight": take("norm.weight", (D,))}
    lm_head = take("lm_head.weight", (args.vocab_size, D), optional=args.tie_word_embeddings)
    if not args.tie_word_embeddings:
        out["output.weight"] = lm_head
    for i in range(args.n_layer):
        a, m, o = f"layers.{i}.self_attn.", f"layers.{i}.mlp.", f"layers.{i}."
        q = take(a + "q_proj.weight", (nh * hd, D))
        k = take(a + "k_proj.weight", (nkv * hd, D))
        v = take(a + "v_proj.weight", (nkv * hd, D))
        out[o + "attention.wqkv.weight"] = torch.cat([q, k, v])
        if args.attention_bias:
            qb = take(a + "q_proj.bias", (nh * hd,))
            kb = take(a + "k_proj.bias", (nkv * hd,))
            vb = take(a + "v_proj.bias", (nkv * hd,))
            out[o + "attention.wqkv.bias"] = torch.cat([qb, kb, vb])
        out[o + "attention.wo.weight"] = take(a + "o_proj.weight", (D, nh * hd))
        ob = take(a + "o_proj.bias", (D,), optional=True)
        if ob is not None and bool(ob.any()):
            raise ConversionError(f"{prefix}{a}o_proj.bias is non-zero: an output-projection bias is not supported")
        out[o + "feed_forward.w1.weight"] = take(m + "gate_proj.weight", (args.intermediate_size, D))
        out[o + "feed_forward.w3.weight"] = take(m + "up_proj.weight", (args.intermediate_size, D))
        out[o + "feed_forward.w2.weight"] = take(m + "down_proj.weight", (D, args.intermediate_size))
        out[o + "attention_norm.weight"] = take(f"layers.{i}.input_layernorm.weight", (D,))
        out[o + "ffn_norm.weight"] = take(f"layers.{i}.post_attention_layernorm.weight", (D,))
    left = sorted(sd)
    if left:
        raise ConversionError(f"the checkpoint has tensors the config does not explain: {', '.join(left[:4])}"
                              + (f" and {len(left) - 4} more" if len(left) > 4 else ""))
    for k, v in out.items():
        v = v.contiguous()
        # A view into a larger (e.g. shared, memory-mapped) storage would be saved with all of that storage.
        out[k] = v.clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size() else v
    return out


def convert(folder: Path, dtype_name: "str | None" = None) -> ModelArgs:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder")
    hf = read_hf_config(folder)
    args = build_args(hf, folder)
    files = weight_files(folder)
    dtype_name = dtype_name or hf.get("dtype") or hf.get("torch_dtype")
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None  # None: keep the stored dtype
    sd = map_state_dict(load_weights(files, dtype), args)
    original_tok = folder / "original" / "tokenizer.model"
    if original_tok.exists() and not (folder / "tokenizer.model").exists():
        shutil.copyfile(original_tok, folder / "tokenizer.model")
    tmp = folder / "model.pth.tmp"
    torch.save(sd, tmp)
    cfg_tmp = folder / "config.json.tmp"
    args.to_json(cfg_tmp)
    cfg_tmp.replace(folder / "config.json")  # hf_config.json already holds the HF config (read_hf_config)
    tmp.replace(folder / "model.pth")  # last: a folder with model.pth is complete
    return args


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint_dir", type=Path, required=True, help="folder with the HF config.json + weights")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="stored dtype (default: the HF config's dtype / torch_dtype, else the weights' own)")
    a = ap.parse_args()
    try:
        args = convert(a.checkpoint_dir, a.dtype)
    except Exception as e:  # one line, no traceback: a CLI users run on downloaded folders
        msg = " ".join(str(e).split())
        if not isinstance(e, (ConversionError, FileNotFoundError)):
            msg = f"{type(e).__name__}: {msg}"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {a.checkpoint_dir / 'model.pth'} ({args.arch}, {args.n_layer} layers)", file=sys.stderr)


if __name__ == "__main__":
    main()
