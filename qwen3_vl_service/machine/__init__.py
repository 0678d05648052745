"""The node as it is now: its GPUs (NVML, or a --gpus spec), its processes, who holds a port."""
