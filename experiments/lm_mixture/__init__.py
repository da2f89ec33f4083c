"""A DoReMi-style language-model data mixture (see README.md)."""
