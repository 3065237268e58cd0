"""Weight-only quantization: int8 per output channel, int4 group-wise (group 32/64/128/256).

    python quantize.py --mode int8                                   # default model -> .../model_int8.pth
    python quantize.py --checkpoint_path checkpoints/meta-llama/Meta-Llama-3-8B-Instruct/model.pth \\
        --mode int4 --groupsize 128                                  # -> model_int4.g128.pth beside model.pth

The quantized file sits beside model.pth and shares its config.json; model.load_model detects it (by the
`__quantization__` entry it carries, checked against the file name), so generate.py, eval.py and benchmark.py take
it as --checkpoint_path unchanged. Every nn.Linear is quantized (q/k/v, o, gate/up/down and the output head, as
gpt-fast does); embeddings and norms stay in full precision (a tied output head gets its own quantized copy).

On-disk format (device independent; the device-specific int4 layout is made at load time):
  int8:  <linear>.weight int8 [N, K]; <linear>.scales fp32 [N]; w ~= weight * scales[:, None] (symmetric, per row)
  int4:  <linear>.weight uint8 [N, Kp / 2], two codes per byte, column 2j in the HIGH nibble and 2j+1 in the low
         one (the input format of CUDA's aten._convert_weight_to_int4pack); <linear>.scales_and_zeros bf16
         [Kp / g, N, 2] (gpt-fast / tinygemm convention: w ~= (code - 8) * scale + zero, codes 0..15, zero = min +
         8 * scale); Kp is K padded with zero columns to a multiple of the group size (the input is zero-padded
         to match). Qwen2's q/k/v bias stays as <linear>.bias in full precision.

Matmul kernels:
  int8  CPU, up to CPU_KERNEL_MAX_ROWS rows (decode): aten._weight_int8pack_mm (one byte read per weight, bf16
        activations) behind a custom op (int8_mm_cpu), for the shapes it handles (Int8Linear.cpu_kernel); it costs
        about what dequantize-and-matmul costs from ~16-32 rows on (a GEMV per row), so longer inputs take that path.
        Elsewhere: F.linear(x, weight.to(x.dtype)) * scales (gpt-fast; on CUDA the cast fuses into the GEMV).
  int4  CUDA: aten._weight_int4pack_mm (tinygemm, bf16 activations) on aten._convert_weight_to_int4pack's layout;
        CPU: aten._weight_int4pack_mm_for_cpu on aten._convert_weight_to_int4pack_for_cpu's layout (present in
        torch 2.13 CPU), wrapped in a custom op for torch.compile (see int4_mm_cpu), bf16 activations (its fp32
        path is a scalar loop, 30x slower), for up to CPU_KERNEL_MAX_ROWS rows (decode); longer inputs (prefill)
        dequantize and matmul;
        elsewhere, or when a kernel is missing or fails the load-time probe: a plain unpack + dequantize + F.linear.
  At load, each (device, group size, inner k tiles) combination is probed once against the plain dequantized
  matmul on random data, so a layout mismatch (e.g. a torch version whose packing convention differs) falls back
  to the plain path with a warning instead of producing wrong tokens; `describe(model)` reports the kernel used.

The output is written to a temporary file in the same folder and renamed when complete: an interrupted or failed
run leaves the old file (if any) and no partial one. A truncated or foreign checkpoint is one error line.
"""
import os
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below load torch: the one line cli.run_main gives later
    import signal

    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("interrupted\n"), os._exit(130)))

import argparse
import pickle
import re
import signal
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import cli
import model as M
from cli import UserError

GROUP_SIZES = (32, 64, 128, 256)
# aten._weight_int4pack_mm_for_cpu has a vectorised path for bf16 activations only: with fp32 ones a 1536 x 640 layer
# (group 128, 1 thread, AVX-512, torch 2.13) takes 1.67 ms a row, with bf16 ones 0.054 ms (fp32 dense 0.078 ms,
# int8 0.056 ms); so activations go in as bf16, like the int8 kernel's. Per row it is a GEMV: 0.37 ms at 16 rows
# against 0.42 ms for the fp32 matmul, 1.4 ms at 64 rows against 1.3 ms, so larger inputs (prefill) dequantize
# and matmul instead.
CPU_KERNEL_MAX_ROWS = 16
META_KEY = "__quantization__"
_PROBED = {}  # (device, groupsize, inner_k_tiles, kernel) -> (ok, detail)


# ---------------------------------------------------------------------------------------------------------------
# Quantization arithmetic (plain torch; shared by quantize.py, the modules' fallback path and the tests)
# ---------------------------------------------------------------------------------------------------------------
def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (int8 [N, K], fp32 scales [N]), symmetric per output channel: w ~= q * scale."""
    wf = w.float()
    scales = wf.abs().amax(dim=1).clamp(min=1e-8) / 127
    q = (wf / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales


def padded_k(k: int, groupsize: int) -> int:
    return -(-k // groupsize) * groupsize


def quantize_int4(w: Tensor, groupsize: int) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (codes int32 [N, Kp] in 0..15, scales_and_zeros bf16 [Kp / g, N, 2]); asymmetric min-max per group.

    The scale and zero are rounded to bf16 first and the codes computed from the rounded values, so the stored
    parameters are exactly the ones the codes were fitted to."""
    if groupsize not in GROUP_SIZES:
        raise UserError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {groupsize}")
    N, K = w.shape
    Kp = padded_k(K, groupsize)
    wf = F.pad(w.float(), (0, Kp - K))
    g = wf.reshape(N, Kp // groupsize, groupsize)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo).clamp(min=1e-6) / 15).to(torch.bfloat16)
    zeros = (lo + 8 * scales.float()).to(torch.bfloat16)
    lo_r = zeros.float() - 8 * scales.float()
    q = ((g - lo_r[..., None]) / scales.float()[..., None]).round().clamp(0, 15).to(torch.int32).reshape(N, Kp)
    sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [Kp / g, N, 2]
    return q, sz


def pack_nibbles(q: Tensor) -> Tensor:
    """codes [N, Kp] (0..15) -> uint8 [N, Kp / 2], column 2j in the high nibble."""
    return ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """uint8 [N, Kp / 2] -> int32 codes [N, Kp]."""
    p = packed.to(torch.int32)
    return torch.stack([p >> 4, p & 15], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(codes: Tensor, sz: Tensor, groupsize: int) -> Tensor:
    """codes [N, Kp], scales_and_zeros [Kp / g, N, 2] -> w [N, Kp] in fp32."""
    N, Kp = codes.shape
    scales, zeros = sz[..., 0].float().t(), sz[..., 1].float().t()  # [N, Kp / g]
    g = codes.reshape(N, Kp // groupsize, groupsize).float()
    return ((g - 8) * scales[..., None] + zeros[..., None]).reshape(N, Kp)


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------
class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.bias = None
        self.kernel = "int8 dequant-in-linear"

    @property
    def cpu_kernel(self) -> bool:
        """aten._weight_int8pack_mm on the CPU: only for shapes it handles (measured with torch 2.13: widths that
        are not multiples of 16 give wrong results or crash), the real models' multiples of 32 and 8."""
        return (HAS_INT8_CPU and self.weight.device.type == "cpu" and self.in_features % 32 == 0
                and self.out_features % 8 == 0)

    def forward(self, x: Tensor) -> Tensor:
        if self.cpu_kernel and x.numel() // x.shape[-1] <= CPU_KERNEL_MAX_ROWS:
            # CPU decode: aten's int8-weight GEMV reads one byte per weight (the cast below would write and read the
            # dequantized weight every step); it wants bf16 activations (fp32 ones take a slow path), so x is
            # rounded to bf16 for the product and the result cast back.
            shape = x.shape
            y = int8_mm_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight, self.scales.to(torch.bfloat16))
            y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4Linear(nn.Module):
    """Group-wise int4. `weight` holds the on-disk nibble layout until `prepare()` converts it to the device's
    kernel layout (layout: 'nibbles' | 'cpu' | 'cuda')."""

    def __init__(self, in_features: int, out_features: int, groupsize: int, bias: bool = False, device=None,
                 dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.kp = padded_k(in_features, groupsize)
        self.register_buffer("weight", torch.empty(out_features, self.kp // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(self.kp // groupsize, out_features, 2,
                                                             dtype=torch.bfloat16, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.bias = None
        self.layout = "nibbles"
        self.kernel = "int4 unpack+matmul"

    def prepare(self, probe: bool = True):
        """Converts the nibbles to the device's int4pack layout when a kernel exists and passes the probe."""
        if self.layout != "nibbles":
            return
        dev = self.weight.device
        ikt = inner_k_tiles(self.kp)
        kind = "cuda" if dev.type == "cuda" else "cpu" if dev.type == "cpu" else None
        if kind is None or ikt is None or not _kernel_ops_exist(kind) or (kind == "cuda" and self.out_features % 8):
            return
        ok, detail = probe_int4_kernel(dev, self.groupsize, ikt, kind) if probe else (True, "")
        if not ok:
            warnings.warn(f"int4 {kind} kernel unusable ({detail}); using the plain unpack+matmul path")
            return
        if kind == "cpu":  # kept for prefill (see forward); a plain attribute: not a buffer, not counted as read
            self.prefill_nibbles = self.weight
        self.weight = convert_to_int4pack(self.weight, ikt, kind)
        self.layout = kind
        self.kernel = f"int4 aten._weight_int4pack_mm{'_for_cpu' if kind == 'cpu' else ''} (inner_k_tiles {ikt})"

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.kp != self.in_features:
            x2 = F.pad(x2, (0, self.kp - self.in_features))
        if self.layout == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.weight, self.groupsize,
                                                   self.scales_and_zeros.to(torch.bfloat16)).to(x.dtype)
        elif self.layout == "cpu" and x2.shape[0] <= CPU_KERNEL_MAX_ROWS:
            y = int4_mm_cpu(x2.to(torch.bfloat16).contiguous(), self.weight, self.groupsize,
                            self.scales_and_zeros.to(torch.bfloat16)).to(x.dtype)
        else:
            nibbles = self.prefill_nibbles if self.layout == "cpu" else self.weight
            w = dequantize_int4(unpack_nibbles(nibbles), self.scales_and_zeros, self.groupsize)
            y = F.linear(x2, w.to(x.dtype))
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, groupsize={self.groupsize}, "
                f"layout={self.layout}")


def dense_weight(lin: nn.Module) -> Tensor:
    """The weight [out, in] of a linear of any format, in full precision (for policies that look at a projection,
    e.g. CriticalKV's |W_o v|)."""
    if isinstance(lin, nn.Linear):
        return lin.weight
    if isinstance(lin, Int8Linear):
        return lin.weight.float() * lin.scales.float()[:, None]
    if isinstance(lin, Int4Linear):
        nibbles = {"nibbles": lin.weight, "cpu": getattr(lin, "prefill_nibbles", None)}.get(lin.layout)
        if nibbles is None:
            raise ValueError("the int4 CUDA layout does not keep the nibbles a dense weight is read from")
        return dequantize_int4(unpack_nibbles(nibbles), lin.scales_and_zeros, lin.groupsize)[:, :lin.in_features]
    raise ValueError(f"no dense weight for a {type(lin).__name__}")


HAS_INT8_CPU = hasattr(torch.ops.aten, "_weight_int8pack_mm")


@torch.library.custom_op("kvcompile::int8_mm_cpu", mutates_args=())
def int8_mm_cpu(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """aten._weight_int8pack_mm (CPU: x [M, K] bf16 times int8 weight [N, K] with per-row scales) behind an opaque
    custom op, for the same Inductor lowering failure as int4_mm_cpu below."""
    return torch.ops.aten._weight_int8pack_mm(x, weight, scales)


@int8_mm_cpu.register_fake
def _(x, weight, scales):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("kvcompile::int4_mm_cpu", mutates_args=())
def int4_mm_cpu(x: Tensor, packed: Tensor, groupsize: int, scales_and_zeros: Tensor) -> Tensor:
    """aten._weight_int4pack_mm_for_cpu behind an opaque custom op: Inductor (torch 2.13) fails to lower the aten op
    when its input is a fused pointwise result (LoweringException in unwrap_storage_for_input), so under
    torch.compile the kernel is called as an extern kernel, its neighbours still fused around it."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, groupsize, scales_and_zeros)


@int4_mm_cpu.register_fake
def _(x, packed, groupsize, scales_and_zeros):
    return x.new_empty(x.shape[0], packed.shape[0])


def inner_k_tiles(kp: int):
    """tinygemm's inner k tiles: the largest of 8, 4, 2 with kp % (tiles * 16) == 0 (None when none fits)."""
    for t in (8, 4, 2):
        if kp % (t * 16) == 0:
            return t
    return None


def _kernel_ops_exist(kind: str) -> bool:
    names = ("_convert_weight_to_int4pack", "_weight_int4pack_mm") if kind == "cuda" else \
        ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
    return all(hasattr(torch.ops.aten, n) for n in names)


def convert_to_int4pack(nibbles: Tensor, ikt: int, kind: str) -> Tensor:
    if kind == "cpu":  # takes the unpacked int32 codes [N, K]
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(nibbles).contiguous(), ikt)
    try:  # torch >= 2.5: uint8 [N, K / 2], even column in the high nibble
        return torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), ikt)
    except RuntimeError:  # older builds took the int32 codes
        return torch.ops.aten._convert_weight_to_int4pack(unpack_nibbles(nibbles).contiguous(), ikt)


def probe_int4_kernel(device, groupsize: int, ikt: int, kind: str):
    """Runs the kernel once on random codes against the plain dequantized matmul; cached per combination."""
    key = (str(device), groupsize, ikt, kind)
    if key in _PROBED:
        return _PROBED[key]
    try:
        gen = torch.Generator().manual_seed(0)
        N, K = 64, max(ikt * 16, groupsize) * 2
        w = torch.randn(N, K, generator=gen)
        codes, sz = quantize_int4(w, groupsize)
        x = torch.randn(3, K, generator=gen)
        ref = x @ dequantize_int4(codes, sz, groupsize).t()
        lin = Int4Linear(K, N, groupsize)
        lin.weight, lin.scales_and_zeros = pack_nibbles(codes).to(device), sz.to(device)
        lin.weight = convert_to_int4pack(lin.weight, ikt, kind)
        lin.layout = kind
        y = lin(x.to(device)).float().cpu()
        err = float((y - ref).abs().max() / ref.abs().max())
        result = (err < 0.02, f"relative error {err:.2e} vs the plain dequantized matmul")
    except Exception as e:  # a missing kernel for this device/build
        result = (False, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
    _PROBED[key] = result
    return result


# ---------------------------------------------------------------------------------------------------------------
# Model-level operations
# ---------------------------------------------------------------------------------------------------------------
def parse_mode(name: str) -> dict:
    """'int8' | 'int4' | 'int4.gN' -> {'mode': 'int8'} / {'mode': 'int4', 'groupsize': N} (int4 default g128)."""
    m = re.fullmatch(r"int8|int4(?:\.g(\d+))?", name or "")
    if not m:
        raise UserError(f"unknown weight format {name!r}; allowed: int8, int4, int4.g32, int4.g64, int4.g128, "
                        f"int4.g256")
    if name == "int8":
        return {"mode": "int8"}
    g = int(m.group(1) or 128)
    if g not in GROUP_SIZES:
        raise UserError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {g}")
    return {"mode": "int4", "groupsize": g}


def format_name(q: dict) -> str:
    return "int8" if q["mode"] == "int8" else f"int4.g{q['groupsize']}"


def file_name(q: dict) -> str:
    return f"model_{format_name(q)}.pth"


def _linear_names(model) -> list:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _set_module(model, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _empty_like_linear(lin: nn.Linear, q: dict, device=None):
    has_bias = lin.bias is not None
    if q["mode"] == "int8":
        return Int8Linear(lin.in_features, lin.out_features, has_bias, device=device)
    return Int4Linear(lin.in_features, lin.out_features, q["groupsize"], has_bias, device=device)


def swap_linears(model, q: dict):
    """Replaces every nn.Linear by an empty quantized module (on the meta device, before load_state_dict)."""
    for name in _linear_names(model):
        _set_module(model, name, _empty_like_linear(model.get_submodule(name), q, device="meta"))
    return model


def quantize_linear(lin: nn.Linear, q: dict) -> nn.Module:
    w = lin.weight.detach()
    mod = _empty_like_linear(lin, q, device=w.device)
    if q["mode"] == "int8":
        mod.weight, mod.scales = quantize_int8(w)
    else:
        codes, sz = quantize_int4(w, q["groupsize"])
        mod.weight, mod.scales_and_zeros = pack_nibbles(codes), sz
    if lin.bias is not None:
        mod.bias = lin.bias.detach().clone()
    return mod


@torch.no_grad()
def quantize_model(model, q: dict, prepare_kernels: bool = True):
    """In place: every nn.Linear of a loaded model becomes its quantized counterpart (on the weights' device);
    a tied output head is untied (the embedding keeps its full-precision table). Returns the model."""
    if isinstance(q, str):
        q = parse_mode(q)
    for name in _linear_names(model):
        _set_module(model, name, quantize_linear(model.get_submodule(name), q))
    model.quantization = dict(q)
    if prepare_kernels:
        prepare(model)
    return model


def prepare(model):
    """After the model sits on its device: int4 weights go to the device's kernel layout (probed once)."""
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.prepare()
    return model


def describe(model) -> str:
    """The kernels the quantized linears use, e.g. 'int4 aten._weight_int4pack_mm_for_cpu (inner_k_tiles 4)'."""
    kinds = {}
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            kernel = "int8 aten._weight_int8pack_mm (CPU decode, bf16 activations)" \
                if isinstance(m, Int8Linear) and m.cpu_kernel else m.kernel
            kinds[kernel] = kinds.get(kernel, 0) + 1
    return "; ".join(f"{k} x{n}" for k, n in kinds.items()) or "none"


def check_meta(meta, weights: Path) -> dict:
    """Validates the __quantization__ entry of a file against its name (model_int8.pth / model_int4.gN.pth)."""
    if not isinstance(meta, dict) or "mode" not in meta:
        raise ValueError(f"{weights}: malformed {META_KEY} entry {meta!r}")
    q = parse_mode(format_name(meta) if meta["mode"] in ("int8", "int4") else str(meta["mode"]))
    m = re.fullmatch(r"model_(int8|int4\.g\d+)\.pth", Path(weights).name)
    if m and m.group(1) != format_name(q):
        raise ValueError(f"{weights}: the file name says {m.group(1)} but its contents are {format_name(q)}")
    return q


def quantized_state_dict(model) -> dict:
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd[META_KEY] = dict(model.quantization)
    return sd


# torch.load's messages for a file that is not a (complete) torch.save archive
_NOT_A_CHECKPOINT = ("PytorchStreamReader", "zip archive", "mmap can only be used", "inline_container",
                     "Weights only load failed")


def _unreadable(weights: Path, detail: str) -> UserError:
    return UserError(f"{weights} is not a readable checkpoint ({detail}); it may be truncated (an interrupted "
                     f"download or conversion): prepare it again")


def check_checkpoint_file(weights: Path):
    """Cheap checks before any work: config.json is valid JSON, the weights file a complete torch.save archive (its
    directory sits at the end, so a truncated file has none). One clear error (UserError) naming the file."""
    weights = Path(weights)
    if (weights.parent / "config.json").is_file():
        cli.model_config(weights)  # a damaged config.json: one line naming it, not a bare JSON message
    if weights.is_file() and not zipfile.is_zipfile(weights):
        size = weights.stat().st_size
        raise _unreadable(weights, "empty file" if size == 0 else f"{size} bytes, no complete torch.save archive")


def load_model(checkpoint, device, dtype) -> "M.Transformer":
    """The loader for every weight format: model.pth, or this module's model_int8.pth / model_int4.gN.pth (their
    linears are swapped for the quantized ones before the weights are assigned). checkpoint: the file or its folder.
    A truncated or foreign weights file is one clear error (UserError) naming it."""
    checkpoint = Path(checkpoint)
    weights = checkpoint / "model.pth" if checkpoint.is_dir() else checkpoint
    check_checkpoint_file(weights)
    try:
        return M.load_model(checkpoint, device, dtype, quantized=sys.modules[__name__])
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        if isinstance(e, RuntimeError) and not any(x in str(e) for x in _NOT_A_CHECKPOINT):
            raise
        raise _unreadable(weights, cli.one_line(str(e).split(". ")[0])[:160]) from None


def quantize_checkpoint(weights: Path, q: dict, out: Path = None, device: str = "cpu") -> Path:
    """Loads model.pth (fp weights), quantizes every linear, writes model_int8.pth / model_int4.gN.pth beside it."""
    weights = Path(weights)
    out = check_out(weights, out, q)
    model = load_model(weights, device, None)
    if getattr(model, "quantization", None):
        raise UserError(f"{weights} is already quantized ({format_name(model.quantization)}); quantize model.pth")
    if out.exists() and out.resolve() == weights.resolve():  # (after the load: it is memory-mapped, cheap)
        raise UserError(f"--out {out} is the checkpoint being quantized; give another file name")
    quantize_model(model, q, prepare_kernels=False)
    sd = {k: v.cpu() for k, v in quantized_state_dict(model).items() if isinstance(v, Tensor)}
    sd[META_KEY] = dict(q)
    with cli.atomic_path(out) as tmp:  # a temporary name in the same folder, renamed when complete
        torch.save(sd, tmp)
    return out


def check_out(weights: Path, out, q: dict) -> Path:
    """The output file, checked before any work: not a folder, in a folder we can write."""
    out = Path(out) if out else weights.parent / file_name(q)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name, e.g. {out / file_name(q)}")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    cli.check_writable(out.parent, "--out")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=None,
                   help="model.pth (or its folder); default: SmolLM2-135M-Instruct, prepared offline on first use")
    p.add_argument("--mode", required=True, choices=["int8", "int4"])
    p.add_argument("--groupsize", type=int, default=None,
                   help=f"int4 group size: {', '.join(map(str, GROUP_SIZES))} (default 128)")
    p.add_argument("--device", default="cpu", help="where to quantize (cpu or cuda; the file is the same)")
    p.add_argument("--out", type=Path, default=None, help="output file (default: beside model.pth)")
    cli.one_line_errors(p)
    a = p.parse_args(argv)
    cli.run_main(run, a)


def run(a):
    if a.mode == "int8" and a.groupsize is not None:
        raise UserError("--groupsize applies to --mode int4 only (int8 is per output channel)")
    q = parse_mode("int8" if a.mode == "int8" else f"int4.g{a.groupsize or 128}")
    weights = cli.resolve_checkpoint(a.checkpoint_path)
    if a.device != "cpu" and not (a.device.startswith("cuda") and torch.cuda.is_available()):
        raise UserError(f"--device {a.device}: not available (use cpu)")
    out = quantize_checkpoint(weights, q, a.out, a.device)
    mib = out.stat().st_size / 2**20
    print(f"wrote {out} ({format_name(q)}, {mib:.1f} MiB; source {weights.stat().st_size / 2**20:.1f} MiB)",
          file=sys.stderr)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, cli.run_main reports Ctrl-C
    main()
