"""`python -m pipeline.evaluation`: score samples against a shard split (see pipeline.evaluation.evaluate)."""

import sys

from pipeline.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
