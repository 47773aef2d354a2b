"""`code/predict.py` by concern:

- `loading`: the model a config names (any family, or a PEFT adapter on its base), checked before it is loaded;
- `decoding`: a model run over a data set (a classifier's predictions, a sequence model's loss and greedy decoding);
- `metrics`: the metrics of an evaluation from its per-example rows;
- `evaluation` and `statistics`: what each mode computes and writes, and the joins of sharded runs;
- `config`: the program's keys (`PredictConfig`); `program`: `run`, the program's body.
"""
