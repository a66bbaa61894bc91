"""Reports: leaderboards, comparisons, figures, reference numbers, scoring of external predictions, publishing."""
