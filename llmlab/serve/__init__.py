"""The OpenAI-compatible server: `llmlab serve CHECKPOINT` (see `app.py`)."""
