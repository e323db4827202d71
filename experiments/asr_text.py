"""Table 5 (beyond the paper): the full model reading gold transcripts vs recognised (ASR) text — trained and
tested on gold, trained on gold and tested on recognised text, trained and tested on recognised text — over all
five leave-one-session-out folds, with each setting's WER and scripted overlap beside its scores.

    python experiments/asr_text.py                                 # embedded default: tiny offline Whisper track
    ser transcribe --dataset DS --model openai/whisper-large-v3    # real IEMOCAP: the track first, then
    python experiments/asr_text.py --dataset DS --preset paper --gpus-per-trial 1

The embedded default writes its "tiny" track (a random Whisper: its text is noise) on first use; any other track
must exist (`ser transcribe`). Only the two rows that read the same recognised test text are compared in pairs.
"""

import sys

from ser_platform.cli import experiment_main

if __name__ == "__main__":
    sys.exit(experiment_main("asr_text", __doc__))
