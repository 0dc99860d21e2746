"""``python -m awq.reproduce``: the paper's experiments end to end (:mod:`awq.experiments.reproduce`)."""
import sys

from awq.experiments.reproduce import cli

if __name__ == "__main__":
    sys.exit(cli())
