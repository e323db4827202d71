"""Table 3: where the metric loss is applied — the fused embedding F(x), the speech embedding or the text
embedding (loss.space = fused / speech / text) — each over all five leave-one-session-out folds.

    python experiments/embedding_space.py                          # embedded default: synthetic corpus, local
    python experiments/embedding_space.py --dataset DS --preset paper --gpus-per-trial 1
"""

import sys

from ser_platform.cli import experiment_main

if __name__ == "__main__":
    sys.exit(experiment_main("embedding_space", __doc__))
