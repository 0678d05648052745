"""Pure decisions before anything starts: GPUs, the allocation, the model, the capacity plan, vLLM argv."""
