"""Reports: the comparison tables and figures, and the README's generated tables."""
