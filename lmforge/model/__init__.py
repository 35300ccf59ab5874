"""The decoder Transformer, its configuration and presets, and Hugging Face checkpoint folders."""
