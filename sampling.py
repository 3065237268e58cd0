"""Sampling: the one home for turning logits into tokens (generate.py's decoding, speculative.py's rejection
sampling). No host sync anywhere, so every function runs inside a compiled step and a CUDA graph."""
import torch
from torch import Tensor


def filtered_probs(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """The distribution sample() draws from (temperature > 0): [B, V] probabilities after top_k / top_p
    (unnormalised after top_p: the exponential race does not need a normalised row)."""
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs


def draw(probs: Tensor, generator=None) -> Tensor:
    """One token per row of (unnormalised) probabilities [N, V] -> [N, 1] by an exponential race: argmax of
    p / E with E ~ Exp(1) picks index i with probability p_i / sum(p). Unlike torch.multinomial it needs no host
    sync, so it runs inside a CUDA graph; the scale of a row does not matter."""
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1, keepdim=True)


def sample(logits: Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """logits [B, V] -> next token [B, 1]. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    return draw(filtered_probs(logits, temperature, top_k, top_p))


def probabilities(logits: Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """logits [N, V] -> the normalised distribution sample() draws from [N, V] (temperature 0: one-hot argmax).
    Rejection sampling compares p / q ratios, so rows must be normalised."""
    if temperature <= 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    probs = filtered_probs(logits, temperature, top_k, top_p)
    return probs / probs.sum(-1, keepdim=True)
