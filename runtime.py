"""The model steps every entry point runs, and the one recipe for compiling them.

prefill and decode_one_token end in a sample (sampling.py); compile_decode / compile_prefill are how any step
function is compiled (generate.py, eval.py, perplexity.py, speculative.py and benchmark.py all use them):
  decode: fullgraph (a graph break would be a silent slowdown), CUDA graphs on GPU ("reduce-overhead");
  prefill: dynamic shapes and NOT fullgraph, because prompt compression and some policies' prefill pick positions
  on the host (data-dependent sizes; those spots are torch.compiler.disable'd and run eagerly), so a new prompt
  length neither fails nor recompiles.
"""
import resource

import torch

from sampling import sample


def prefill(model, x: torch.Tensor, input_pos: torch.Tensor, row: int = None, context_len: int = None,
            **sampling) -> torch.Tensor:
    """The prompt x [1, T] at positions input_pos [T] into the caches (row: one sequence of a batch of caches;
    context_len: the prompt's length when a scoring extension follows it); returns the first new token [1, 1]."""
    logits = model(x, input_pos, prefill=True, row=row, context_len=context_len, last_only=True)
    return sample(logits[:, -1], **sampling)


def decode_one_token(model, cur: torch.Tensor, input_pos: torch.Tensor, **sampling) -> torch.Tensor:
    """cur [B, 1] at input_pos ([1] shared, or [B, 1] per sequence) -> the next tokens [B, 1]."""
    logits = model(cur, input_pos)
    return sample(logits[:, -1], **sampling)


def compile_decode(fn, device: str, dynamic=None):
    """A decode-time step: one graph (fullgraph), CUDA graphs on GPU."""
    mode = "reduce-overhead" if str(device).startswith("cuda") else None
    return torch.compile(fn, mode=mode, fullgraph=True, dynamic=dynamic)


def compile_prefill(fn):
    """A prefill step: dynamic shapes, graph breaks allowed at the host-side prompt compression (module doc)."""
    return torch.compile(fn, dynamic=True)


def compile_fns(device: str, compile_decode_step: bool, compile_prefill_step: bool):
    """(prefill, decode_one_token), each compiled when asked."""
    pre, decode = prefill, decode_one_token
    if compile_decode_step:
        decode = compile_decode(decode_one_token, device)
    if compile_prefill_step:
        pre = compile_prefill(prefill)
    return pre, decode


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_bytes(device: str) -> int:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB: process peak RSS
