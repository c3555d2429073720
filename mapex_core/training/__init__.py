"""Training loops: MAE pre-training (fine-tuning comes with the pruning issue), checkpoints."""
