"""The paper's cluster masks as frontier methods: ``cluster_oracle`` and ``cluster_predicted``.

Both run the paper's thresholded MLP (:class:`awq.methods.paper_mlp.SparseMLP`) with centroid codebooks
(:func:`awq.methods.codebook.load_codebooks`); ``cluster_predicted`` takes each token's cluster from a
trained :mod:`awq.methods.label_predictor` file instead of the true mask. :class:`ClusterMLP` meters, per token:
a projection with a codebook reads the rows of its kept neurons (``density(out != 0)`` after the
centroid mask: ``A AND C[label]`` for the oracle, ``C[label]`` for the predictor), one without reads
all of them; down reads the columns of nonzero ``h``. A down-output codebook saves no reads.
The predictor's weights are added as ``extra`` (its multiply-adds as a fraction of the MLP's).
The oracle is not realizable (it needs the true mask, i.e. the dense computation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from awq.methods.codebook import load_codebooks
from awq.methods.common import MethodError, token_density
from awq.methods.label_predictor import load_predictor
from awq.methods.paper import paper_thresholds
from awq.methods.paper_mlp import SparseMLP, SparsityConfig


@dataclass
class ClusterConfig(SparsityConfig):
    extra: float = 0.0
    info: Optional[dict] = None

    def extra_read(self, model: nn.Module) -> float:
        return float(self.extra)

    def summary(self) -> dict:
        return {"thresholds": self.thresholds, "codebooks": sorted(self.codebooks), "extra": self.extra,
                "info": self.info}

    def build(self, mlp: nn.Module, i: int) -> "ClusterMLP":
        return ClusterMLP.from_mlp(mlp, i, self)


class ClusterMLP(SparseMLP):
    """SparseMLP whose gate/up reads are counted as the kept (centroid-masked) rows."""

    def _account(self, g: torch.Tensor, u: torch.Tensor, h: torch.Tensor) -> None:
        dh = token_density(h != 0)
        fg = token_density(g != 0) if "gate_proj" in self._codebooks else 1.0
        fu = token_density(u != 0) if "up_proj" in self._codebooks else 1.0
        self.read_meter.add(self.layer_idx, dh.numel(), fg, fu, dh)


def calibrate_cluster(model: nn.Module, windows, density: float, *, centroids: Optional[str],
                      predictor: Optional[str] = None, model_name: Optional[str] = None) -> ClusterConfig:
    """Paper thresholds at ``density`` plus the centroid codebooks (oracle, or predicted with ``predictor``)."""

    thr, src = paper_thresholds(model, windows, density, model_name)
    if predictor is None:
        if not centroids:
            raise MethodError("cluster_oracle needs centroid files: pass --centroids gate=FILE,up=FILE,down=FILE")
        books, info = load_codebooks(centroids, model, mode="oracle")
        return ClusterConfig(thresholds=thr, codebooks=books, extra=0.0, info={"centroids": info, "thresholds": src})

    label_fns, pinfo = load_predictor(predictor, model, centroids=centroids)
    books, info = load_codebooks(centroids or pinfo["centroids_spec"], model, mode="predicted", label_fns=label_fns)
    return ClusterConfig(thresholds=thr, codebooks=books, extra=float(pinfo["cost"]["flop_fraction"]),
                         info={"centroids": info, "predictor": {k: pinfo[k] for k in ("path", "sha256", "rank")},
                               "thresholds": src})
