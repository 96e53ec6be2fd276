"""Placeholder; the Redis fixture module is written by the store work."""
