"""A DreamPRM-style process reward model (see README.md)."""
