"""Batch jobs through the running service: an OpenAI Batch input file in, answers out, resumable."""
