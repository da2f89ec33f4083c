"""Digits with corrupted domains (see README.md)."""
