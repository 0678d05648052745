"""The media file server: local images and videos for vLLM over loopback HTTP."""
