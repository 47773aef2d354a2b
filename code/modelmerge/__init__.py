"""Library behind the programs in code/: the merge methods (`methods`, their `catalogue`) and the merge driver
(`merging`) over checkpoint reading and writing (`io`); model families (`families`), data, training, statistics and
prediction (README.md's code map)."""
