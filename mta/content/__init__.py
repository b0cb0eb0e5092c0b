"""Content stages: pure functions over a message's bytes, and the clamd client."""
