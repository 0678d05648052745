"""Effects: start, supervise, stop and show the units of a deployment; processes, run state, readiness, logs."""
