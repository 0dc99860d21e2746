"""``python -m awq.frontier``: every method's quality against the weights it reads (:mod:`awq.experiments.frontier`)."""
import sys

from awq.experiments.frontier import cli

if __name__ == "__main__":
    sys.exit(cli())
