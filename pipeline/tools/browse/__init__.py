"""`discomv browse`: a local, read-only web app over a run's manifests and shards (server.py, data.py,
media.py, pages.py, static/)."""
