"""Floor 5: the commands and what they run: training, scoring, predict, export, protocols, resume."""
