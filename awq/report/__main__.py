"""``python -m awq.report``: regenerate (or ``--check``) every generated block of README.md, ARTIFACT.md and docs/."""
import sys

from awq.report.generate import cli

if __name__ == "__main__":
    sys.exit(cli())
