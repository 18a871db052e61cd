"""umiq's worker pools: the three role model servers and the tool executor."""
