"""Model Merge of TMoLE checkpoints (linear, TIES, slerp)."""
