"""umiq's spine: protocol, store, queues, settings and the trajectory state machine that everything imports."""
