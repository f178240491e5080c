"""python -m pipeline.train --config FILE [key=value ...]: the training loop in pipeline.train.loop."""

import sys

from pipeline.train.loop import main

sys.exit(main())
