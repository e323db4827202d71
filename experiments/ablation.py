"""Table 1: the ablation — the full model, without focus attention (model.focus_attention=false) and without the
metric loss (loss.alpha=0) — each over all five leave-one-session-out folds, on the same sweep machinery.

    python experiments/ablation.py                                 # embedded default: synthetic corpus, local
    python experiments/ablation.py --dataset DS --preset paper --gpus-per-trial 1

The full model puts the metric loss on the speech embedding (the paper's Table 1 "Full model" scores are its
Table 3 "Speech Embedding" row); `--set loss.space=fused` changes that for all three variants.
"""

import sys

from ser_platform.cli import experiment_main

if __name__ == "__main__":
    sys.exit(experiment_main("ablation", __doc__))
