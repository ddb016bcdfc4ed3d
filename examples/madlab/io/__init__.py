"""Floor 1: the error base, atomic writes, decoding one image file, cache keys and the config."""
