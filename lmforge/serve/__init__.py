"""The OpenAI-compatible HTTP server and its chat page."""
