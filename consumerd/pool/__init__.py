"""Parent side of the workers: the pool, what it knows of each worker, and what task code may reach."""
