"""The worker: a sans-io task state machine, its async shell and the worker process."""
