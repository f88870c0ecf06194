"""Example user filters (docs/filters.md, "Your own filter"): each a `Scorer` of oqvl.filter.user."""
