"""Floor 3: attacks. Given morph methods (``morphs.MORPH_METHODS``) and synthetic ones
(``synthesis.SYNTHETIC_METHODS``), one registry each; the attack sets training serves; their
separability check."""
