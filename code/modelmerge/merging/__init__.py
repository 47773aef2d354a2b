"""The merge driver: everything about a merge except the arithmetic of its method (modelmerge.methods).

By concern:
- `options`: `MergeOptions`, what a merge is asked to do (frozen, built once by the program, or read from JSON;
  the one place the device is checked), `MergeError`;
- `parameters`: methods by name, their parameters converted and checked against their ranges;
- `plan`: one `TensorTask` per output tensor, from file headers only (inconsistent inputs fail first), and the
  `MergePlan` of a whole merge, which its `run` executes;
- `execute`: the tasks streamed tensor by tensor (elementwise methods in blocks of rows) into the output;
- `lora`: planning `lora-` merges of PEFT adapters;
- `mergekit`: mergekit's YAML front end (schema, model references and slices, parameter scopes, planning,
  tokenizer source);
- `frontend`: `plan(options)`, the one planner of the command line's merges and mergekit's YAML
  (`mergekit`), and `merge(options)`, the whole merge (or one part of it);
- `shards`: a merge split into parts that separate processes merge, and the join of the parts;
- `provenance`: model fingerprints recorded in statistics, and the check that a merge pairs them rightly;
- `trim`: the trimmed task vector of TIES as a statistic;
- `cli`: what the programs under code/ share (one-line errors, argument types, --help's method list).
"""
from modelmerge.merging.execute import Summary, run_tasks
from modelmerge.merging.frontend import merge
from modelmerge.merging.options import DTYPES, MergeError, MergeOptions, Shard
from modelmerge.merging.plan import check_same_tensors
from modelmerge.merging.shards import join_parts

__all__ = ["DTYPES", "MergeError", "MergeOptions", "Shard", "Summary", "check_same_tensors", "join_parts", "merge",
           "run_tasks"]
