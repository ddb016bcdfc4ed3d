"""Floor 3: face detection (YuNet), 5-point alignment, and the crop policy every command shares."""
