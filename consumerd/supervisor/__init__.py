"""The supervisor: the loop and its parts (intake, settling, safety net, signals, reload, status)."""
