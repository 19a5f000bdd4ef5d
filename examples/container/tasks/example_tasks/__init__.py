"""Example consumerd tasks, packaged for an image built FROM consumerd's (examples/container)."""
