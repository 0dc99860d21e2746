"""``python -m awq.models``: list / fetch the known model aliases (:mod:`awq.load.models`)."""
import sys

from awq.load.models import cli

if __name__ == "__main__":
    sys.exit(cli())
