"""Facts every layer shares: errors and exit codes, the CLI frame, files, hosts, units, findings, names."""
