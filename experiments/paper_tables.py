"""Tables 1-3 of the paper from one command: the ablation (Table 1), the paper's four (alpha, beta) points
(Table 2) and the three embedding spaces of the metric loss (Table 3), in turn, each a sweep of its own (its own
MLflow parent run) over all five leave-one-session-out folds. The same as `ser sweep --experiment tables`, with
the same flags; at the end it prints where each table is in the MLflow UI.

    python experiments/paper_tables.py                             # embedded default: synthetic corpus, local
    python experiments/paper_tables.py --dataset DS --preset paper --gpus-per-trial 1 --max-concurrent 4
    python experiments/paper_tables.py --resume --name NAME        # continue: finished sweeps are kept
"""

import sys

from ser_platform.cli import experiment_main

if __name__ == "__main__":
    sys.exit(experiment_main("tables", __doc__))
