"""The Deployment: every unit (media server, vLLM services, replicas, DP ranks, router), derived once and purely."""
