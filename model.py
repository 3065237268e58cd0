"""One hand-written decoder for the Llama family (Llama-2/3/3.1/3.2, Mistral, Qwen2, SmolLM2).

Checkpoint folder format (written by scripts/convert_*.py):
  config.json  - the ModelArgs fields below, from the HF config at conversion (never guessed).
  model.pth    - state dict with these names (HF rotate-half q/k row order, no permutation):
      tok_embeddings.weight                  [vocab, dim]
      layers.{i}.attention.wqkv.weight       [(n_head + 2 * n_local_heads) * head_dim, dim]  q rows, then k, then v
      layers.{i}.attention.wqkv.bias         (only when attention_bias, Qwen2)
      layers.{i}.attention.wo.weight         [dim, n_head * head_dim]
      layers.{i}.feed_forward.w1/w3/w2.weight  gate / up / down
      layers.{i}.attention_norm.weight, layers.{i}.ffn_norm.weight, norm.weight
      output.weight                          (absent when tie_word_embeddings)
  tokenizer.json or tokenizer.model          (see tokenizer.py)
"""
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ModelArgs:
    name: str = ""
    arch: str = "llama"  # llama | mistral | qwen2: one decoder, the differences are the fields below
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_local_heads: int = -1  # KV heads (GQA); -1 means n_head
    dim: int = 4096
    intermediate_size: int = 11008
    head_dim: int = -1  # -1 means dim // n_head
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None  # HF rope_scaling dict: rope_type llama3 | linear
    norm_eps: float = 1e-5
    block_size: int = 4096  # the model's trained context (max_position_embeddings)
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    tie_word_embeddings: bool = False
    bos_id: Optional[int] = None
    eos_ids: list = field(default_factory=list)
    chat_format: Optional[str] = None  # chatml | llama3 | llama2 | None
    add_bos: bool = False

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.head_dim == -1:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_local_heads:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_local_heads {self.n_local_heads}")

    @classmethod
    def from_json(cls, path) -> "ModelArgs":
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {unknown}")
        return cls(**raw)

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(name=name, **PRESETS[name])

    def to_json(self, path):
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


_LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)
# Shapes of the real models, for random-weight benchmarks (the bytes moved per token are the same).
PRESETS = {
    "SmolLM2-135M": dict(vocab_size=49152, n_layer=30, n_head=9, n_local_heads=3, dim=576, intermediate_size=1536,
                         rope_base=100000.0, block_size=8192, tie_word_embeddings=True, chat_format="chatml",
                         bos_id=1, eos_ids=[2, 0]),
    "SmolLM2-1.7B": dict(vocab_size=49152, n_layer=24, n_head=32, n_local_heads=32, dim=2048, intermediate_size=8192,
                         rope_base=130000.0, block_size=8192, tie_word_embeddings=True, chat_format="chatml",
                         bos_id=1, eos_ids=[2, 0]),
    "Llama-2-7b": dict(vocab_size=32000, n_layer=32, n_head=32, dim=4096, intermediate_size=11008,
                       block_size=4096, chat_format="llama2", bos_id=1, eos_ids=[2], add_bos=True),
    "Mistral-7B": dict(arch="mistral", vocab_size=32000, n_layer=32, n_head=32, n_local_heads=8, dim=4096,
                       intermediate_size=14336, block_size=32768, chat_format="llama2", bos_id=1, eos_ids=[2],
                       add_bos=True),
    "Meta-Llama-3-8B": dict(vocab_size=128256, n_layer=32, n_head=32, n_local_heads=8, dim=4096,
                            intermediate_size=14336, rope_base=500000.0, block_size=8192, chat_format="llama3",
                            bos_id=128000, eos_ids=[128001, 128009], add_bos=True),
    "Meta-Llama-3.1-8B": dict(vocab_size=128256, n_layer=32, n_head=32, n_local_heads=8, dim=4096,
                              intermediate_size=14336, rope_base=500000.0, block_size=131072,
                              rope_scaling=_LLAMA3_SCALING, chat_format="llama3", bos_id=128000,
                              eos_ids=[128001, 128008, 128009], add_bos=True),
    "Llama-3.2-1B": dict(vocab_size=128256, n_layer=16, n_head=32, n_local_heads=8, dim=2048, intermediate_size=8192,
                         head_dim=64, rope_base=500000.0, block_size=131072, tie_word_embeddings=True,
                         rope_scaling={**_LLAMA3_SCALING, "factor": 32.0}, chat_format="llama3", bos_id=128000,
                         eos_ids=[128001, 128008, 128009], add_bos=True),
    "Meta-Llama-3-70B": dict(vocab_size=128256, n_layer=80, n_head=64, n_local_heads=8, dim=8192,
                             intermediate_size=28672, rope_base=500000.0, block_size=8192, chat_format="llama3",
                             bos_id=128000, eos_ids=[128001, 128009], add_bos=True),
    "Qwen2-7B": dict(arch="qwen2", vocab_size=152064, n_layer=28, n_head=28, n_local_heads=4, dim=3584,
                     intermediate_size=18944, rope_base=1000000.0, norm_eps=1e-6, block_size=32768,
                     attention_bias=True, chat_format="chatml", bos_id=None, eos_ids=[151645, 151643]),
}


def rope_tables(args: ModelArgs, length: int, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin tables [length, head_dim] in fp32 for rotate-half RoPE, with the model's frequency scaling."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind != "default":
        raise ValueError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")
    angles = torch.outer(torch.arange(length, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D]; cos/sin broadcastable to [.., T, D]. Rotate-half form, computed in fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], need_probs: bool = False):
    """Decode-style attention without copying K/V per query head.

    q [B, H, T, D]; k, v [B, Hkv, S, D]; mask bool [B, Hkv or 1, T, S] (True = attend) or None.
    The query heads of a GQA group are folded into the row dimension ([B, Hkv, G*T, D]), so every
    K/V head is read once and a per-KV-head mask (head-specific eviction) broadcasts over its group.
    Returns y [B, H, T, D] and, with need_probs, the probabilities [B, Hkv, G, T, S] in fp32.
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    qf = q.reshape(B, Hkv, G * T, D)
    m = None if mask is None else mask.unsqueeze(2).expand(-1, -1, G, -1, -1).reshape(B, mask.shape[1], G * T, -1)
    if not need_probs:
        y = F.scaled_dot_product_attention(qf, k, v, attn_mask=m)
        return y.reshape(B, H, T, D), None
    scores = (qf.float() @ k.float().transpose(-1, -2)) / math.sqrt(D)
    if m is not None:
        scores = scores.masked_fill(~m, float("-inf"))
    probs = scores.softmax(dim=-1)
    y = (probs.to(v.dtype) @ v).reshape(B, H, T, D)
    return y, probs.reshape(B, Hkv, G, T, -1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = args.n_head, args.n_local_heads, args.head_dim
        qkv_dim = (args.n_head + 2 * args.n_local_heads) * args.head_dim
        self.wqkv = nn.Linear(args.dim, qkv_dim, bias=args.attention_bias)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)
        self.kv_cache = None  # set by Transformer.setup_caches

    def forward(self, x: Tensor, input_pos: Tensor, prefill: bool, row=None, context_len=None) -> Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_local_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_local_heads, self.head_dim).transpose(1, 2)
        # The cache positions q and k (RoPE), attends, and keeps what its policy keeps: the prompt (prefill; row: one
        # sequence of a batch of caches; context_len: the prompt's length when a scoring extension follows it) or
        # T >= 1 new tokens (decode).
        if prefill:
            y = self.kv_cache.prefill(input_pos, k, v, q, row=row, context_len=context_len)
        else:
            y = self.kv_cache.decode(input_pos, k, v, q)
        y = y.transpose(1, 2).reshape(B, T, q_size)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, input_pos, prefill, row=None, context_len=None):
        h = x + self.attention(self.attention_norm(x), input_pos, prefill, row, context_len)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.config = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_seq_length = -1
        # RoPE tables [max_seq_length, head_dim], made by setup_caches on the weights' device.
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)

    def setup_caches(self, max_seq_length: int, make_cache, rope_length: int = None):
        """make_cache(layer_idx) -> a cache module (see cache.py), given the RoPE tables [rope_length, head_dim]
        (default max_seq_length; longer when a policy looks at positions beyond the sequence)."""
        self.max_seq_length = max_seq_length
        device = self.tok_embeddings.weight.device
        cos, sin = rope_tables(self.config, max(rope_length or 0, max_seq_length), device=device)
        self.rope_cos, self.rope_sin = cos, sin
        for i, layer in enumerate(self.layers):
            layer.attention.kv_cache = cache = make_cache(i)
            cache.set_rope(cos, sin)

    def forward(self, idx: Tensor, input_pos: Tensor, prefill: bool = False, row: int = None,
                context_len: int = None, last_only: bool = False) -> Tensor:
        """idx [B, T] token ids at positions input_pos: [T] shared by the batch, or [B, T] per sequence (batched
        decoding of prompts of different lengths). row: prefill one sequence (idx [1, T]) into its row of the batched
        caches. context_len (prefill): the first context_len tokens are the prompt, the rest a scoring
        extension the caches read but do not keep (KVzip). Returns logits [B, T, vocab] in fp32; last_only: of the last
        prompt position only ([B, 1, vocab]: position context_len - 1 with an extension), all a prefill needs."""
        for cache in self.caches:
            cache.set_tokens(idx, prefill, row)  # token ids, for policies that look at them (FastGen's classes)
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, input_pos, prefill, row, context_len)
        if last_only:  # the vocabulary projection of one position, not of every prompt token
            x = x[:, -1:] if context_len is None else x[:, context_len - 1:context_len]
        return self.output(self.norm(x)).float()

    @property
    def caches(self):
        return [layer.attention.kv_cache for layer in self.layers]


def load_model(checkpoint: Path, device, dtype, quantized=None) -> Transformer:
    """checkpoint: a folder with config.json + model.pth, or a weights file in it. A quantized file (quantize.py's
    model_int8.pth / model_int4.gN.pth, marked by its __quantization__ entry) needs its linears swapped in before
    the weights are assigned: quantize.load_model passes `quantized` (an object with check_meta, swap_linears and
    prepare: the quantize module), so this file imports nothing of the project."""
    checkpoint = Path(checkpoint)
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    weights = checkpoint / "model.pth" if checkpoint.is_dir() else checkpoint
    args = ModelArgs.from_json(folder / "config.json")
    with torch.device("meta"):
        model = Transformer(args)
    state = torch.load(weights, mmap=True, weights_only=True, map_location="cpu")
    quant = state.pop("__quantization__", None)  # model_int8.pth / model_int4.gN.pth, written by quantize.py
    if quant is not None:
        if quantized is None:
            raise ValueError(f"{weights} is a quantized checkpoint: load it with quantize.load_model")
        quant = quantized.check_meta(quant, weights)
        quantized.swap_linears(model, quant)  # a tied head is stored as its own quantized linear
    tied = args.tie_word_embeddings and quant is None
    expected = set(model.state_dict())
    if tied:
        expected.discard("output.weight")
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"{weights} does not match {folder / 'config.json'}: "
                         f"missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
    for name, tensor in state.items():
        want = model.state_dict()[name].shape
        if tensor.shape != want:
            raise ValueError(f"{weights}: {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(want)}")
    model.load_state_dict(state, assign=True, strict=False)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    model = model.to(device=device, dtype=dtype).eval()
    model.quantization = quant
    if quant is not None:
        quantized.prepare(model)  # int4: the device's kernel layout
    return model


def random_model(args: ModelArgs, device, dtype, seed: int = 0) -> Transformer:
    """A model of a preset's shape with random weights (for speed measurements without a checkpoint)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(args).to(dtype)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    return model.eval()
