"""``python -m awq.entry``: the main job: a model with sparsified MLPs, perplexity or lm-eval tasks (:mod:`awq.experiments.entry`)."""
import sys

from awq.experiments.entry import cli

if __name__ == "__main__":
    sys.exit(cli())
