"""Table 4 (its runnable part): the model against its own baselines — speech only, text only, early fusion (pooled
speech and text embeddings concatenated -> F(x), no crossmodal transformer), crossmodal without focus attention,
and the full model (model.fusion / model.focus_attention) — each over all five leave-one-session-out folds.

    python experiments/compare_models.py                           # embedded default: synthetic corpus, local
    python experiments/compare_models.py --dataset DS --preset paper --gpus-per-trial 1

The metric loss sits on F(x) (loss.space=fused) for all five, the one embedding every variant has, so only the
fusion differs. The published models of the paper's Table 4 are listed under the table, not re-run.
"""

import sys

from ser_platform.cli import experiment_main

if __name__ == "__main__":
    sys.exit(experiment_main("compare_models", __doc__))
