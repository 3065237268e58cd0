"""The model steps every entry point runs, and the one recipe for compiling them.

prefill and decode_one_token end in a sample (sampling.py); compile_decode / compile_prefill are how any step
function is compiled (generate.py, eval.py, perplexity.py, speculative.py and benchmark.py all use them):
  decode: fullgraph (a graph break would be a silent slowdown), CUDA graphs on GPU ("reduce-overhead");
  prefill: dynamic shapes and NOT fullgraph, because prompt compression and some policies' prefill pick positions
  on the host (data-dependent sizes; those spots are torch.compiler.disable'd and run eagerly), so a new prompt
  length neither fails nor recompiles.
"""
import resource
import weakref

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


def compile_decode(fn, device: str, dynamic=None, any_batch: bool = False):
    """A decode-time step: one graph (fullgraph), CUDA graphs on GPU.

    any_batch: the batch dimension stays symbolic (inputs and every cache buffer that has it), so one graph serves
    every batch size above 1 and torch's on-disk caches reuse it in a later run with another batch size (a batch of
    1 is specialised by torch and gets its own graph). Off by default: the symbolic graph takes longer to compile
    the first time (BENCHMARK.md)."""
    mode = "reduce-overhead" if str(device).startswith("cuda") else None
    compiled = torch.compile(fn, mode=mode, fullgraph=True, dynamic=dynamic)
    if not any_batch:
        return compiled

    marked = weakref.WeakSet()  # caches whose buffers carry the mark (once per cache, not per step)

    def step(model, cur, input_pos, **kwargs):
        batch = cur.shape[0]
        if batch > 1:
            fresh = [c for c in model.caches if c not in marked]
            for t in [cur, input_pos, *(b for c in fresh for b in c.buffers())]:
                if t.dim() and t.shape[0] == batch:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            marked.update(fresh)
        # module buffers are otherwise traced with static shapes whatever their marks say
        with torch._dynamo.config.patch(force_nn_module_property_static_shapes=False,
                                        force_parameter_static_shapes=False):
            return compiled(model, cur, input_pos, **kwargs)
    return step


def compile_prefill(fn):
    """A prefill step: dynamic shapes, graph breaks allowed at the host-side prompt compression (module doc)."""
    return torch.compile(fn, dynamic=True)


def compile_fns(device: str, compile_decode_step: bool, compile_prefill_step: bool, any_batch: bool = False):
    """(prefill, decode_one_token), each compiled when asked (any_batch: see compile_decode)."""
    pre, decode = prefill, decode_one_token
    if compile_decode_step:
        decode = compile_decode(decode_one_token, device, any_batch=any_batch)
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
