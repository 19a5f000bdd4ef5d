"""What the tests, the benchmarks and the chaos soak share: the daemon as a child process, /proc looks.

Not shipped in the wheel (pyproject packages only `consumerd*`).
"""
