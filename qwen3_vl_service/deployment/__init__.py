"""The Deployment: every unit (media server, vLLM, replicas, DP ranks, router), derived once, purely."""
