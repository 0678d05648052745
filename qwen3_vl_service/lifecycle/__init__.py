"""Effects: start, supervise, stop and show the units of a deployment; run state, readiness, logs."""
