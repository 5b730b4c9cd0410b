"""Analysis: checkpoint sources by file format, exact spectra, metrics, the cache, Fisher information."""
