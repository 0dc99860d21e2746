"""``python -m awq.calibrate``: per-layer thresholds for a target sparsity (:mod:`awq.methods.calibration`)."""
import sys

from awq.methods.calibration import cli

if __name__ == "__main__":
    sys.exit(cli())
