"""Raw sources -> the multi-task dataset (parquet per task and split) and its Ray Data streams."""
