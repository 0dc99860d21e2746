"""Active neuron sets of the intermediate dimension, in every form a selector may give them.

A set is a 0/1 mask ``[F]`` (bool, uint8 or floating), per-token masks ``[T, F]``, an int16/32/64
index list ``[k]``, or cluster labels ``[T]`` plus a centroid table ``[K, F]``.  :func:`group_tokens`
turns any of them into distinct group masks and each token's group; :func:`cluster_selector` maps
per-projection cluster predictors and centroid tables to a selector for
:class:`awq.methods.gathered.GatheredSparseMLP`.  Bad sets raise ``ValueError`` naming the problem.
"""
from __future__ import annotations

from typing import Callable, Mapping, Union

import torch

# active = mask [F] / masks [..., F] (bool or 0/1) / int indices [k] / (labels [...], centroids [K, F])
Active = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor], None]
# selector(layer_idx, x2d [T, H]) -> Active, or {"active": Active, "out_mask": [H] or [T, H] mask}
Selector = Callable[[int, torch.Tensor], Union[Active, dict]]


def _is_index(t: torch.Tensor) -> bool:
    """int16/32/64 tensors are neuron indices; bool, uint8 and floating tensors are 0/1 masks."""
    return t.dtype in (torch.int16, torch.int32, torch.int64)


def as_bool_mask(m: torch.Tensor, width: int, what: str, dim_name: str = "MLP intermediate size") -> torch.Tensor:
    if m.dim() == 0 or m.shape[-1] != width:
        got = "no width (a scalar)" if m.dim() == 0 else f"width {m.shape[-1]}"
        raise ValueError(f"{what} has {got} but the {dim_name} is {width}")
    if m.dtype == torch.bool:
        return m
    if m.is_floating_point() or m.dtype in (torch.uint8, torch.int8):
        return m != 0
    raise ValueError(f"{what} has dtype {m.dtype}; want bool, uint8 or floating 0/1 values")


def indices_from_active(active: torch.Tensor, width: int) -> torch.Tensor:
    """A 1-D mask [F] (bool/uint8/float) or a 1-D int16/32/64 index tensor -> sorted unique int64 indices."""
    if active.dim() != 1:
        raise ValueError(f"expected a 1-D mask or index tensor, got shape {tuple(active.shape)}")
    if _is_index(active):
        idx = active.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= width):
            raise ValueError(f"active indices out of range [0, {width})")
        return torch.unique(idx)  # sorted
    return torch.nonzero(as_bool_mask(active, width, "active mask")).flatten()


def group_tokens(
    active: Active, num_tokens: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token active sets -> (group masks [G, F] bool, group id per token [T] int64).

    ``active``: a shared mask [F] / indices, per-token masks [T, F], or (labels [T], centroids [K, F]).
    """
    if isinstance(active, (tuple, list)):
        if len(active) != 2:
            raise ValueError("cluster form of 'active' must be (labels, centroids)")
        labels, cents = active
        cents = as_bool_mask(cents, width, "centroid table")
        labels = labels.reshape(-1).long()
        if labels.numel() != num_tokens:
            raise ValueError(f"{labels.numel()} cluster labels for {num_tokens} tokens")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= cents.shape[0]):
            raise ValueError(f"cluster labels out of range [0, {cents.shape[0]})")
        uniq, inv = torch.unique(labels, return_inverse=True)
        return cents[uniq], inv
    if not isinstance(active, torch.Tensor):
        raise ValueError(f"unsupported active set of type {type(active).__name__}")
    if active.dim() == 1:
        if _is_index(active):
            mask = torch.zeros(width, dtype=torch.bool, device=active.device)
            mask[indices_from_active(active, width)] = True
        else:
            mask = as_bool_mask(active, width, "active mask")
        return mask[None], torch.zeros(num_tokens, dtype=torch.long, device=active.device)
    masks = as_bool_mask(active, width, "active mask").reshape(-1, width)
    if masks.shape[0] != num_tokens:
        raise ValueError(f"{masks.shape[0]} active masks for {num_tokens} tokens")
    if num_tokens == 1:
        return masks, torch.zeros(1, dtype=torch.long, device=masks.device)
    uniq, inv = torch.unique(masks, dim=0, return_inverse=True)
    return uniq, inv


class PreparedIndices:
    """Validated sorted indices shared by all tokens (from set_active)."""

    __slots__ = ("idx",)

    def __init__(self, idx: torch.Tensor) -> None:
        self.idx = idx.contiguous()


def cluster_selector(
    label_fns: Mapping[str, Callable[[torch.Tensor, int], torch.Tensor]],
    centroids: Mapping[str, torch.Tensor],
) -> Selector:
    """A selector from per-projection cluster predictors (``label_fn(x, layer_idx) -> labels [T]``,
    the :mod:`awq.methods.codebook` signature) and centroid tables ``{proj: [K, width]}``.

    gate_proj/up_proj labels pick centroid rows whose AND is the token's active neuron set (only
    neurons active in both can contribute, since act(0) = 0); a down_proj label picks the output
    mask.  A projection without a predictor does not restrict the set."""
    unknown = set(label_fns) - {"gate_proj", "up_proj", "down_proj"}
    if unknown:
        raise ValueError(f"unknown projections {sorted(unknown)}")
    missing = [p for p in label_fns if p not in centroids]
    if missing:
        raise ValueError(f"no centroid table for {missing}")
    tables = {p: as_bool_mask(c, c.shape[-1], f"{p} centroids") for p, c in centroids.items()}
    gu = [p for p in ("gate_proj", "up_proj") if p in label_fns]
    if len(gu) == 2 and tables[gu[0]].shape[-1] != tables[gu[1]].shape[-1]:
        raise ValueError("gate_proj and up_proj centroid tables differ in width")
    # decode (one token): the active index list of a centroid (pair) is computed once and cached
    cache: dict[tuple[int, ...], PreparedIndices] = {}

    def select(layer_idx: int, x2: torch.Tensor) -> dict:
        out: dict = {"active": None, "out_mask": None}
        labs = {p: label_fns[p](x2, layer_idx).reshape(-1).long() for p in label_fns}
        for p, lab in labs.items():
            k = tables[p].shape[0]
            if lab.numel() != x2.shape[0]:
                raise ValueError(f"{p} predictor gave {lab.numel()} labels for {x2.shape[0]} tokens")
            if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= k):
                raise ValueError(f"{p} cluster labels out of range [0, {k})")
        if gu and x2.shape[0] == 1:
            key = tuple(int(labs[p][0]) for p in gu)
            prep = cache.get(key)
            if prep is None:
                m = tables[gu[0]][key[0]]
                if len(gu) == 2:
                    m = m & tables[gu[1]][key[1]]
                prep = PreparedIndices(torch.nonzero(m).flatten())
                if len(cache) < 65536:
                    cache[key] = prep
            out["active"] = prep
        elif len(gu) == 1:
            out["active"] = (labs[gu[0]], tables[gu[0]])
        elif len(gu) == 2:
            out["active"] = tables[gu[0]][labs[gu[0]]] & tables[gu[1]][labs[gu[1]]]
        if "down_proj" in label_fns:
            out["out_mask"] = tables["down_proj"][labs["down_proj"]]
        return out

    return select
