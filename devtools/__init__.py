"""Development tools, not shipped in the runtime package: tiny model, FP8 checkpoint, media, GPU smoke."""
