"""Helpers for testing tasks and running the daemon locally (the Pub/Sub emulator)."""
