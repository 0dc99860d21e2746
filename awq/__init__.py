"""Activation-sparsity harness: thresholded MLPs, activation-pattern stores, centroid masks (Dhar et al. 2025)."""
__version__ = "0.1.0"
