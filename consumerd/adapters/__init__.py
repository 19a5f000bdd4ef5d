"""One module per external system (Pub/Sub, systemd, journald, Prometheus, Landlock, process titles)."""
