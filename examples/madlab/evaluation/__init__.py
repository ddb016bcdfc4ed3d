"""Floor 2: ISO/IEC 30107-3 metrics, dev-fixed thresholds, reports, score files and plots."""
