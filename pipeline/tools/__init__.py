"""Entry points and commands: cli, audit, report, summary, cost, demo (+ its synthetic media and server)."""
