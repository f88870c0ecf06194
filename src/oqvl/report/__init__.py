"""Stage 8, report: result tables beside the paper's, compute accounting, plots."""
