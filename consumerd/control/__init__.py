"""The control socket: its server, the commands it runs, and the client `consumerd status` uses."""
