"""The interconnect check: GPU topology from NVML and a checked, timed all-reduce under a hard timeout."""
