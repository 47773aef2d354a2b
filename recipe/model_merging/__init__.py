"""The pipeline's recipes (Sisyphus Job classes) and the graph pieces its configs share.

Laid out as upstream Sisyphus expects a recipe collection: `recipe/` is on `IMPORT_PATHS`, so this package is
imported as `model_merging.x` and its jobs get ids `model_merging/<module>/<Job>.<hash>`. The
`ukp.huggingface` package beside it offers the Job signatures of the paper authors' own recipes.
"""
