"""mergekit's YAML merge configurations, run by our driver with mergekit's semantics.

The same file that drives `mergekit-yaml` (mergekit 0.1.5, https://github.com/arcee-ai/mergekit) gives the
same tensors here for the methods both projects have. What is read:

- `merge_method`: a mergekit name from `MERGEKIT_METHODS` or any of our method names.
- `models: [{model, parameters}]` (with `base_model` added as an input when not listed), or
  `slices: [{sources: [{model, layer_range: [a, b], parameters}], base_model, parameters}]`, which build the
  output layer by layer (renumbered from 0, `num_hidden_layers` of the output config updated). Outside the
  layers, the first slice's sources give the embeddings and the last slice's everything after the layers.
- `parameters` at the top, per slice and per model, in mergekit's precedence (model > slice > top). A value
  is a scalar, a gradient (a list interpolated over the layers of the slice: t = i / (n − 1) for layer i
  of n, t = 0 outside the layers) or a list of `{filter, value}` where the first entry whose `filter` is a
  substring of the tensor name (or `*`) applies.
- LiNeS's `lines_beta` / `lines_alpha` and KnOTS's `knots` (methods/lines.py, methods/knots.py; not mergekit's)
  in the top-level `parameters` only, as single values: they act on the whole merge of any method with a
  `base_model`, as `--x:lines_beta` and `--x:knots` do on the command line.
- `dtype` (working and output precision), `out_dtype`, `tokenizer_source`: `union` (the union vocabulary,
  every model's embedding / LM-head rows rebuilt for it as mergekit does: modelmerge.vocabulary), or `base`
  or `model:PATH` / `PATH` (vocabularies are not permuted then, so the models' vocabularies must agree).
- Model references `PATH` or `PATH+LORA_PATH` (the LoRA adapter folded into the model, W + s·B·A).

Every key's value is checked before any model is opened (`check_types`: the types mergekit's own schema
allows), a wrong one refused with its full path, e.g. `models[1].parameters must be a mapping ...`.

Layers are found by name: the tensors `<prefix>.<i>.<rest>` whose prefix has indices 0..n−1, n from the
config's `num_hidden_layers` when present. Tensors before the layers are told from those after them by
name (embeddings: `embed`, `wte`, `wpe`), where mergekit reads a per-architecture table.

By concern:
- `schema`: reading the YAML file and checking every key's type (`read_config`, `check_types`);
- `references`: model references opened once, slices of layers, where a checkpoint's layers are;
- `scopes`: parameter settings resolved per tensor (model > slice > top; gradients, filters), the options of
  the whole merge (LiNeS, KnOTS);
- `planning`: the `MergePlan` of a configuration (`plan_config`), mergekit's method names (`MERGEKIT_METHODS`);
- `tokenizer`: the folder whose tokenizer files the output carries (`tokenizer_source`).
"""
from modelmerge.merging.mergekit.planning import MERGEKIT_METHODS, plan_config
from modelmerge.merging.mergekit.schema import check_types, read_config
from modelmerge.merging.mergekit.scopes import evaluate_setting

__all__ = ["MERGEKIT_METHODS", "check_types", "evaluate_setting", "plan_config", "read_config"]
