"""Who gets the next request: policies, selection, leases and the wait queue, ejection, task affinity."""
