"""Pub/Sub: the GAPIC client, its credentials, and the threads that pull, ack and forward."""
