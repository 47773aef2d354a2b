"""Library behind the programs in code/: merging, statistics, training, data and prediction."""
