"""The spine: the Stage contract, options and config, manifests, the runner and its workers."""
