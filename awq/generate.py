"""``python -m awq.generate``: greedy generation with the lean decoder, beside dense (:mod:`awq.decode.generate`)."""
import sys

from awq.decode.generate import cli

if __name__ == "__main__":
    sys.exit(cli())
