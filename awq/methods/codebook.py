"""Centroid swap: mask each token's projection output with the centroid of its cluster.

One :class:`CentroidCodebook` per projection is loaded once, kept on the model's device and shared
by every layer (one codebook per projection, as clustered).  Per layer and token:

* ``oracle`` (paper, artifact-behaviour 3.10): label = nearest centroid of the token's true mask
  ``A = (y != 0)`` under the active-only distance (= largest overlap, ties to the lowest index);
  output = ``y`` where ``C[label]`` is 1, i.e. the effective mask is ``A AND C[label]``.
* ``replace`` (extension): same label, but the mask is ``C[label]`` alone over the *unthresholded*
  output: what a perfect cluster predictor would deliver.
* ``predicted`` (extension, see :mod:`awq.methods.label_predictor`): the label comes from a predictor applied to
  the MLP input, without looking at the true mask; mask = ``C[label]`` over the unthresholded output.

Assignment is a single ``[T, F] x [F, K]`` matrix product per layer and projection, exact for 0/1
values either way: on the CPU int8 (``torch._int_mm``) or fp32, whichever :func:`awq.kernels.hw.overlap_kernel`
picks for this machine (capability or a cached one-time measurement; ``kernel=`` or
``AWQ_KERNEL_OVERLAP`` override); elsewhere fp32.  Running counts give the precision (fraction of true active neurons kept) and the
effective sparsity of every layer.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from awq.kernels.hw import check_fp32_exact, overlap_kernel
from awq.load.arch import PROJS, decoder_layers
from awq.methods.base import base_mlp
from awq.store.centroids import CentroidError, load_centroids, metrics_from_counts
from awq.store.thresholds import file_sha256

log = logging.getLogger(__name__)

MODES = ("oracle", "replace", "predicted")
_SHORT = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

LabelFn = Callable[[torch.Tensor, int], torch.Tensor]  # (mlp input x [..., H], layer) -> labels [...]


class CentroidCodebook(nn.Module):
    def __init__(self, centroids: torch.Tensor, proj: str, num_layers: int, mode: str = "oracle",
                 label_fn: Optional[LabelFn] = None, kernel: Optional[str] = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown centroid mode '{mode}' (want one of {MODES})")
        if mode == "predicted" and label_fn is None:
            raise ValueError("centroid mode 'predicted' needs a predictor")
        self.proj, self.mode, self.label_fn, self.kernel = proj, mode, label_fn, kernel
        # one copy of the centroids [K, F]: int8 0/1 serves the exact int8 GEMM on CPU and, viewed as bool, the mask
        self.register_buffer("c_int8", centroids.to(torch.int8).contiguous(), persistent=False)
        self.register_buffer("c_size", centroids.sum(1, dtype=torch.float64), persistent=False)
        self._c_float: Optional[torch.Tensor] = None  # fp32 GEMM operand, made on first use of the fp32 kernel
        self._cpu_kernel: tuple[int, str] = (0, "")  # (torch threads, awq.kernels.hw's choice): asked once per setting
        self.k, self.width = centroids.shape
        # running counts per layer: active (|A|), covered (|A & C|), predicted (|C_label|), nonzero out, cells
        self.register_buffer("counts", torch.zeros(num_layers, 5, dtype=torch.float64), persistent=False)
        self.track = True

    @torch.no_grad()
    def labels(self, y: torch.Tensor, x: torch.Tensor, layer_idx: int) -> torch.Tensor:
        if self.mode == "predicted":
            return self.label_fn(x, layer_idx).reshape(-1)
        a = y.reshape(-1, y.shape[-1]) != 0
        if a.device.type == "cpu" and a.shape[0] > 0 and self.cpu_kernel() == "int8":
            # int8 x int8 -> int32 GEMM: exact; the faster one where the CPU has int8 dot products
            return torch.argmax(torch._int_mm(a.to(torch.int8), self.c_int8.T), dim=1)  # first max on ties
        if self._c_float is None or self._c_float.device != self.c_int8.device:
            check_fp32_exact(self.width)  # 0/1 products summed in fp32: exact below 2**24
            self._c_float = self.c_int8.float()
        return torch.argmax(a.float() @ self._c_float.T, dim=1)

    def cpu_kernel(self) -> str:
        """The CPU overlap kernel ("int8" / "fp32") from :func:`awq.kernels.hw.overlap_kernel`, cached per thread count
        (it runs once per layer and token batch)."""
        threads = torch.get_num_threads()
        if self._cpu_kernel[0] != threads:
            self._cpu_kernel = (threads, overlap_kernel(self.kernel, self.width))
        return self._cpu_kernel[1]

    @property
    def c_bool(self) -> torch.Tensor:
        """The centroids as a bool ``[K, F]`` mask table (a view of the int8 buffer, no copy)."""
        return self.c_int8.view(torch.bool)

    def forward(self, y: torch.Tensor, *, raw: torch.Tensor, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
        if y.shape[-1] != self.width:
            raise CentroidError(f"{self.proj} centroids have width {self.width} but the layer output has width "
                                f"{y.shape[-1]}")
        lab = self.labels(y, x, layer_idx)
        mask = self.c_bool.index_select(0, lab).view(y.shape)
        out = (y if self.mode == "oracle" else raw) * mask
        if self.track:
            with torch.no_grad():
                c = self.counts[layer_idx]
                c[0] += int(torch.count_nonzero(y))
                nz_out = int(torch.count_nonzero(out))
                # oracle: out != 0 exactly where A & C; otherwise count the overlap explicitly
                c[1] += nz_out if self.mode == "oracle" else int(torch.count_nonzero((y != 0) & mask))
                c[2] += float(self.c_size.index_select(0, lab).sum())
                c[3] += nz_out
                c[4] += y.numel()
        return out

    def stats(self) -> dict:
        c = self.counts.cpu()
        tot = c.sum(0).tolist()
        m = metrics_from_counts(active=tot[0], covered=tot[1], predicted=tot[2], cells=tot[4])
        per_layer = []
        for row in c.tolist():
            if row[4] == 0:
                per_layer.append(None)
                continue
            pl = metrics_from_counts(active=row[0], covered=row[1], predicted=row[2], cells=row[4])
            pl["effective_sparsity"] = 1.0 - row[3] / row[4]
            per_layer.append(pl)
        m["effective_sparsity"] = 1.0 - tot[3] / tot[4] if tot[4] else float("nan")
        m["kept_fraction_of_active"] = m["precision"]
        m["per_layer"] = per_layer
        return m


def parse_centroid_spec(spec: str) -> dict[str, Path]:
    """``gate=FILE,up=FILE,down=FILE`` (any subset; full names gate_proj=... also accepted) or a directory.

    A directory is searched for files whose name contains the projection (``gate``/``up``/``down``)
    and ends in ``.pt`` (a clustering checkpoint ``*.ckpt.pt`` beside its result is ignored); exactly
    one per projection it holds is allowed.
    """
    out: dict[str, Path] = {}
    p = Path(spec)
    if "=" not in spec and p.is_dir():
        for short, proj in _SHORT.items():
            hits = sorted(f for f in p.glob("*.pt") if not f.name.endswith(".ckpt.pt")  # a run's checkpoint
                          and short in f.stem.replace("gate_proj", "gate")
                          .replace("up_proj", "up").replace("down_proj", "down").split("_"))
            if len(hits) > 1:
                raise CentroidError(f"centroid directory {p} holds several {proj} files: {[h.name for h in hits]}")
            if hits:
                out[proj] = hits[0]
        if not out:
            raise CentroidError(f"centroid directory {p} holds no gate/up/down .pt files")
        return out
    for part in spec.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise CentroidError(f"bad --centroids entry '{part}': want gate=FILE,up=FILE,down=FILE or a directory")
        key, val = (s.strip() for s in part.split("=", 1))
        proj = _SHORT.get(key, key)
        if proj not in PROJS:
            raise CentroidError(f"bad --centroids key '{key}' (want gate, up or down)")
        out[proj] = Path(val)
    if not out:
        raise CentroidError("--centroids is empty")
    return out


def check_centroid_proj(path: Path, meta: dict, proj: str) -> None:
    """Refuse a centroid file whose metadata names another projection (e.g. ``up=<a gate_proj file>``)."""
    have = meta.get("proj") if isinstance(meta, dict) else None
    if have is not None and _SHORT.get(str(have), str(have)) != proj:
        raise CentroidError(f"centroid file {path} holds {have} centroids (its metadata), but it was given for {proj}")


def load_codebooks(spec: str, model: nn.Module, mode: str = "oracle",
                   label_fns: Optional[dict[str, LabelFn]] = None,
                   kernel: Optional[str] = None) -> tuple[dict[str, CentroidCodebook], dict]:
    """Load the centroid sets named by ``spec`` once, on the model's device; -> (codebooks, info for results).
    ``kernel``: the CPU overlap kernel ("int8", "fp32"; None/"auto": :func:`awq.kernels.hw.overlap_kernel` decides)."""
    files = parse_centroid_spec(spec)
    layers = decoder_layers(model)
    mlp = base_mlp(layers[0].mlp)  # also on an already sparsified model
    widths = {"gate_proj": mlp.gate_proj.out_features, "up_proj": mlp.up_proj.out_features,
              "down_proj": mlp.down_proj.out_features}
    device = next(model.parameters()).device
    books, info = {}, {"mode": mode, "files": {}}
    for proj, path in files.items():
        c, meta = load_centroids(path, widths[proj])
        check_centroid_proj(path, meta, proj)
        fn = (label_fns or {}).get(proj)
        books[proj] = CentroidCodebook(c, proj, len(layers), mode=mode, label_fn=fn, kernel=kernel).to(device)
        info["files"][proj] = {"path": str(path), "sha256": file_sha256(path), "k": int(c.shape[0]),
                               "centroid_density": float(c.float().mean()), "meta": meta}
        log.info("centroids %s: K=%d width=%d density %.3f (%s)", proj, c.shape[0], c.shape[1],
                 float(c.float().mean()), path)
    return books, info


def codebook_stats(books: dict[str, CentroidCodebook]) -> dict:
    return {"run_stats": {proj: cb.stats() for proj, cb in books.items()}}
