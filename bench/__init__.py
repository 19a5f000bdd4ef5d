"""`make bench`: consumerd against the alternatives, on the same emulator and the same messages."""
