"""The one training loop (`pretrain`), its configuration, and training checkpoints."""
