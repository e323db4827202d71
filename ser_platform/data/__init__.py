"""Data layer: IEMOCAP (real or synthetic) -> Parquet -> leave-one-session-out folds -> Ray Data."""
