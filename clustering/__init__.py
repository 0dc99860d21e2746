"""The clustering suite: binary activation patterns -> K centroid masks (AWC and the paper's baselines).

Modules: :mod:`clustering.sources` (rows to cluster), :mod:`clustering.base` (estimator base class,
checkpoints), :mod:`clustering.distributed` (torch.distributed helpers), :mod:`clustering.seeding`
(initial centres), :mod:`clustering.cli` (shared options and result files); one module per
method / tool, each runnable as ``python -m clustering.<name>`` (or ``python clustering/<name>.py``
with the package installed) and callable as ``main(Config(...))``.
"""


class ClusteringError(ValueError):
    """Bad input or configuration for a clustering run (one-line message)."""
