"""Tie-free token orderings, the building block of every selector.

Selection scores tie often (EWMA frequencies are dyadic fractions, unscored tokens
are all zero). ``torch.topk`` breaks ties by position, which biases a selection
towards one corner of the image; these helpers break ties by the next key and
finally by a seeded random draw. Every function works on ``(B, N)`` tensors on any
device, without host synchronisation.
"""

from __future__ import annotations

import torch


def device_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A seeded generator on ``device``: its draws need no host-to-device copy (which would sync)."""
    return torch.Generator(device=device).manual_seed(int(seed))


def random_keys(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform draws on ``device`` (made on the generator's device, copied only if that differs)."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def order_by(*keys: torch.Tensor, descending: tuple[bool, ...] | None = None) -> torch.Tensor:
    """Permutation ``(B, N)`` sorting by ``keys[0]``, ties by ``keys[1]``, and so on.

    Implemented as stable sorts from the last key to the first (a lexicographic sort).
    """
    descending = descending or (False,) * len(keys)
    order = None
    for key, desc in zip(reversed(keys), reversed(descending)):
        permuted = key if order is None else key.gather(-1, order)
        step = permuted.sort(dim=-1, descending=desc, stable=True).indices
        order = step if order is None else order.gather(-1, step)
    return order


def ranks_from_order(order: torch.Tensor) -> torch.Tensor:
    """Position of each token in ``order`` scaled to [0, 1]: 0 = first, 1 = last."""
    n = order.shape[-1]
    pos = torch.arange(n, device=order.device, dtype=torch.float32).expand_as(order)
    ranks = torch.empty_like(pos).scatter_(-1, order, pos)
    return ranks / max(n - 1, 1)


def top_k(score: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Indices of the ``k`` highest scores per row, exact ties broken at random."""
    tie = random_keys(score.shape, generator, score.device)
    return order_by(score, tie, descending=(True, False))[..., :k]


def first_k_unchosen(order: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """Complete a partial selection to exactly ``k`` tokens per row.

    ``order`` ``(B, N)`` ranks candidates best first; ``chosen`` ``(B, N)`` bool marks
    tokens already taken (at most ``k`` per row). Returns ``(B, k)`` indices: the chosen
    tokens, then the best unchosen ones in ``order``.
    """
    taken = chosen.gather(-1, order)
    need = k - chosen.sum(-1, keepdim=True)
    fill = (~taken) & ((~taken).cumsum(-1) <= need)
    keep = taken | fill
    # keep has exactly k True per row; a stable sort moves them to the front, in order.
    front = (~keep).to(torch.int8).sort(dim=-1, stable=True).indices[..., :k]
    return order.gather(-1, front)
