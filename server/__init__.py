"""Serving: many tasks from one backbone behind an OpenAI-compatible HTTP API (in progress)."""
