"""Table 2: Ray Tune + Optuna (TPE, seeded) over the loss weights alpha and beta, the triplet margin and where the
metric loss sits; every trial trains and scores all five leave-one-session-out folds. `--grid paper` runs exactly
the paper's four (alpha, beta) points instead. The same as `ser sweep --experiment search`, with the same flags.

    python experiments/sweep_loss_weights.py                       # embedded default: synthetic corpus, local
    python experiments/sweep_loss_weights.py --dataset DS --preset paper --trials 40 --gpus-per-trial 1
    python experiments/sweep_loss_weights.py --grid paper --dataset DS
    python experiments/sweep_loss_weights.py --resume --name NAME  # continue an interrupted sweep

The objective is config.sweep.metric, by default val_ua_mean: UA averaged over folds, measured on each fold's
validation speaker (never the test session); test WA/UA are reported beside it.
"""

import sys

from ser_platform.cli import experiment_main

if __name__ == "__main__":
    sys.exit(experiment_main("search", __doc__))
