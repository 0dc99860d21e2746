"""``python -m awq.cluster_predictor``: fit a cluster-neuron predictor file (:mod:`awq.predictor.cluster_files`)."""
import sys

from awq.predictor.cluster_files import cli

if __name__ == "__main__":
    sys.exit(cli())
