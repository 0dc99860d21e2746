"""Sparsity methods: the walker and base class (base.py), the registry (registry.py), one file per method."""
