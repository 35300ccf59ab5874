"""Corpus reading and cleaning, tokenised shards, and the training-window loader."""
