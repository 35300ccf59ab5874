"""Generation from a model: KV-cache decoding, sampling controls, streamed text."""
