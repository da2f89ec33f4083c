"""Natural-text topic domains from chatterbot-corpus with a pretrained MiniLM (see README.md)."""
