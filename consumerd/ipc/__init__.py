"""Records and framing that cross a process boundary (supervisor, fork server, workers) or a thread's."""
