"""``python -m awq.artifact``: the evaluator's quick path, checked claim by claim (:mod:`awq.report.artifact`)."""
import sys

from awq.report.artifact import cli

if __name__ == "__main__":
    sys.exit(cli())
