"""Floor 4: where a run's samples come from: the embedded ORL and lfw_subset sets, folders and CSV manifests."""
