"""Tensor parallelism: `torchrun --nproc_per_node K generate.py ...` shards the model over K processes.

Megatron-style, with torch.distributed only (no communication layer of our own):
  - attention: wqkv is column-parallel by heads (rank r computes q heads [r*H/K, (r+1)*H/K) and the KV heads
    those query heads read, so grouped-query attention stays local); wo is row-parallel (the input columns of the
    rank's q heads), and its partial outputs are summed over the ranks (all-reduce).
  - MLP: w1 / w3 column-parallel over intermediate_size, w2 row-parallel, all-reduce after w2.
  - embeddings, norms and the output head are replicated: every rank computes the same logits and samples the
    same token (same seed), so no token has to be sent between ranks.
Two all-reduces per layer; everything between them, the KV cache and its eviction policy included, runs on the
rank's own heads: each rank's caches are built for n_local_heads / K KV heads (model.config is a per-rank copy),
and no policy looks across KV heads, so the union of the ranks' caches holds what one process would hold.

The all-reduces are torch.distributed's functional collectives (forward hooks on wo and w2, as in gpt-fast): unlike
the in-place dist.all_reduce they trace into the compiled decode step (torch.compile fullgraph) like any other op.
"""
import atexit
import copy
import dataclasses
import os
import sys
import time
import traceback
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed import _functional_collectives as funcol

import quantize
from model import ModelArgs


class Dist(NamedTuple):
    rank: int
    world: int
    local_rank: int
    device: str  # this rank's device: cuda:LOCAL_RANK or cpu


def world_size() -> int:
    """Ranks of the current run (1 when not launched by torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_divisible(config, world: int):
    """One clear error when the model cannot be split evenly over `world` ranks (head-wise and MLP-wise)."""
    sizes = {"n_head": config.n_head, "n_local_heads (KV heads)": config.n_local_heads,
             "intermediate_size": config.intermediate_size}
    bad = [f"{name} {n}" for name, n in sizes.items() if n % world]
    if bad:
        raise ValueError(f"tensor parallelism over {world} ranks needs n_head, n_local_heads (KV heads) and "
                         f"intermediate_size divisible by {world}, but {' and '.join(bad)} "
                         f"{'is' if len(bad) == 1 else 'are'} not; use a number of processes that divides them")


class _Silent:
    """sys.stderr of ranks > 0: os.devnull (for every file method), remembering whether an `error: ...` line was
    written to it."""
    saw_error = False

    def __init__(self, devnull):
        self.devnull = devnull

    def write(self, text):
        self.saw_error = self.saw_error or text.startswith("error: ")
        return self.devnull.write(text)

    def __getattr__(self, name):
        return getattr(self.devnull, name)


def quiet_other_ranks():
    """Under torchrun, ranks > 0 run the same program as rank 0 on the same input; their text, statistics and error
    lines are dropped, so what the user reads is rank 0's alone (one `error: ...` line, not K). Crashes (uncaught
    exceptions) still reach the terminal. Call first thing; idempotent; a no-op outside torchrun and on rank 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0:
        return
    if isinstance(sys.stderr, _Silent):
        return
    sys.stdout.flush()
    devnull = open(os.devnull, "w")
    os.dup2(devnull.fileno(), sys.stdout.fileno())  # fd level: TextStream keeps the sys.stdout it saw at import
    sys.stdout, sys.stderr = devnull, _Silent(devnull)

    def excepthook(kind, value, tb):
        traceback.print_exception(kind, value, tb, file=sys.__stderr__)

    sys.excepthook = excepthook

    def wait_for_rank0():
        # Bad input fails on every rank at about the same time; torchrun stops the others as soon as one exits, so
        # an early exit here could kill rank 0 before it prints its line. Wait (torchrun's SIGTERM ends this).
        if sys.stderr.saw_error:
            time.sleep(10)

    atexit.register(wait_for_rank0)


def maybe_init_distributed(device: str = "auto", config=None) -> Optional[Dist]:
    """Under torchrun (WORLD_SIZE > 1): joins the process group (NCCL on CUDA, gloo on CPU) and returns this rank's
    Dist; None when not distributed. device: the --device flag (auto / cuda: cuda:LOCAL_RANK; cpu: gloo on CPU).
    config (ModelArgs, or the checkpoint's config.json, read only when distributed): checked for divisibility first,
    so that a bad K fails on one line before any rank waits for another."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    quiet_other_ranks()
    if config is not None:
        if not hasattr(config, "n_head"):
            config = ModelArgs.from_json(config)
        check_divisible(config, world)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available (use --device cpu for gloo on CPU)")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"rank {rank} needs cuda:{local_rank} but only {torch.cuda.device_count()} CUDA "
                             f"device(s) are visible; use --nproc_per_node <= {torch.cuda.device_count()}")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        backend, kw = "nccl", {"device_id": torch.device(device)}
    elif device == "cpu":
        backend, kw = "gloo", {}
    else:
        raise ValueError(f"--device {device} under torchrun: use auto, cuda (each rank takes cuda:LOCAL_RANK) or cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, **kw)
        atexit.register(leave_group)  # a run that fails: tear down whatever is left
    return Dist(rank, world, local_rank, device)


def leave_group():
    if dist.is_initialized():
        dist.destroy_process_group()


def finish():
    """After a run that completed on every rank: wait until all ranks are done, then tear the group down, so that
    no rank closes its connections while another is still using them. Nothing without torchrun."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shared_seed(seed: Optional[int]) -> int:
    """The seed every rank uses: the given one, or rank 0's random draw. Sampling runs on each rank on identical
    logits (the head is replicated), so identical generator states give identical tokens without sending any."""
    if seed is not None:
        return seed
    box = [int(torch.randint(0, 2**31 - 1, ()))]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------------------------
def _set(module: nn.Module, name: str, value: torch.Tensor):
    """Replaces a parameter or buffer by its shard, as its own contiguous copy (the full tensor can be freed)."""
    value = value.clone(memory_format=torch.contiguous_format)
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value, requires_grad=False) if isinstance(old, nn.Parameter) else value)


def _check_linear(lin: nn.Module, where: str):
    if isinstance(lin, quantize.Int4Linear):
        raise ValueError(f"{where}: int4 checkpoints cannot be sharded (their group-wise packed layout would have to "
                         f"be cut per rank); use model.pth or model_int8.pth with torchrun")
    if not isinstance(lin, (nn.Linear, quantize.Int8Linear)):
        raise ValueError(f"{where}: cannot shard a {type(lin).__name__}")


def _column_parallel(lin: nn.Module, pieces: list):
    """Keeps the output rows in `pieces` ([(start, stop), ...], concatenated in that order): weight rows, and the
    bias and the int8 per-row scales with them."""
    def cut(t):
        return torch.cat([t[a:b] for a, b in pieces], dim=0)

    _set(lin, "weight", cut(lin.weight))
    for name in ("bias", "scales"):
        if getattr(lin, name, None) is not None:
            _set(lin, name, cut(getattr(lin, name)))
    lin.out_features = sum(b - a for a, b in pieces)


def _row_parallel(lin: nn.Module, start: int, stop: int, group):
    """Keeps the input columns [start, stop); the partial outputs of the ranks are summed by an all-reduce.
    int8 scales are per output row: every rank keeps them all (sum_r (x_r W_r^T) * s = (x W^T) * s)."""
    if getattr(lin, "bias", None) is not None:  # would be added K times by the all-reduce
        raise ValueError("a row-parallel linear with a bias is not supported")
    _set(lin, "weight", lin.weight[:, start:stop])
    lin.in_features = stop - start
    lin.register_forward_hook(lambda _module, _inputs, out: funcol.all_reduce(out, "sum", group))


@torch.no_grad()
def shard_model(model, rank: int, world: int, group=None):
    """In place: keeps rank `rank`'s 1/world of every layer's heads and MLP (module docstring) and installs the
    all-reduces. Call after load_model, before cache.setup (the caches are built from the per-rank config).
    group: the process group (default: the whole world; the process group must be initialized)."""
    cfg = model.config
    check_divisible(cfg, world)
    if getattr(model, "tensor_parallel", None):
        raise ValueError("the model is already sharded")
    for i, layer in enumerate(model.layers):  # before any change: a rejected model is left as it was
        for name in ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
            _check_linear(layer.get_submodule(name), f"layers.{i}.{name}")
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("shard_model needs an initialized process group (tp.maybe_init_distributed)")
        group = dist.group.WORLD
    hd = cfg.head_dim
    nh, nkv, inter = cfg.n_head // world, cfg.n_local_heads // world, cfg.intermediate_size // world
    q0, k0, v0 = 0, cfg.n_head * hd, (cfg.n_head + cfg.n_local_heads) * hd  # wqkv rows: all q, then all k, then v
    for layer in model.layers:
        attn, ff = layer.attention, layer.feed_forward
        # q head j reads KV head j // (n_head / n_local_heads): rank r's q heads read exactly its KV heads.
        _column_parallel(attn.wqkv, [(q0 + rank * nh * hd, q0 + (rank + 1) * nh * hd),
                                     (k0 + rank * nkv * hd, k0 + (rank + 1) * nkv * hd),
                                     (v0 + rank * nkv * hd, v0 + (rank + 1) * nkv * hd)])
        _row_parallel(attn.wo, rank * nh * hd, (rank + 1) * nh * hd, group)
        attn.n_head, attn.n_local_heads = nh, nkv
        _column_parallel(ff.w1, [(rank * inter, (rank + 1) * inter)])
        _column_parallel(ff.w3, [(rank * inter, (rank + 1) * inter)])
        _row_parallel(ff.w2, rank * inter, (rank + 1) * inter, group)
    # The config now describes this rank's shard: cache.setup builds caches for nkv KV heads.
    model.config = dataclasses.replace(cfg, n_head=nh, n_local_heads=nkv, intermediate_size=inter)
    model.tensor_parallel = {"rank": rank, "world": world, "full_config": cfg, "group": group}
    return model


def load_sharded(weights, d: Dist, dtype):
    """load_model on the CPU (memory-mapped, dtype unchanged), shard, then move only the shard to d.device: no rank
    ever holds the whole model on its accelerator."""
    model = quantize.load_model(weights, "cpu", None)
    return shard_model(model, d.rank, d.world).to(device=d.device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------
def reduce_stats(stats: dict) -> dict:
    """cache.cache_stats() of this rank's heads -> the whole model's (no-op when not distributed): byte counts (keys
    ending in _bytes) are summed over the ranks; every other number is averaged, which is exact because the ranks
    hold equal numbers of heads (kept_tokens, compression_ratio, attention_loss are per-head averages) or equal
    values (seen_tokens, kv_budget, layer). Adds tensor_parallel_ranks. Every rank must call it (a collective)."""
    world = world_size()
    if world == 1:
        return stats
    leaves = []  # (container, key, is_bytes, was_int) in a fixed walk order, the same on every rank

    def walk(x, byte_key=False):
        items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
        for k, v in items:
            is_bytes = byte_key or (isinstance(k, str) and k.endswith("_bytes"))
            if isinstance(v, (dict, list)):
                walk(v, is_bytes)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                leaves.append((x, k, is_bytes, isinstance(v, int)))

    out = copy.deepcopy(stats)
    walk(out)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(c[k]) for c, k, _, _ in leaves], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    for (c, k, is_bytes, was_int), v in zip(leaves, t.tolist()):
        v = v if is_bytes else v / world
        c[k] = int(round(v)) if was_int else v
    out["tensor_parallel_ranks"] = world
    return out
