"""Floor 2: samples and reports, identities and splits, folder scans, image datasets, shortcut statistics."""
