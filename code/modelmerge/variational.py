"""Variational learning with IVON (Shen et al., "Variational Learning is Effective for Large Deep Networks",
ICML 2024; the `ivon-opt` package) in train.py, and the posterior it leaves for uncertainty-based gradient matching.

IVON learns a diagonal Gaussian posterior q(θ) = N(m, diag(1 / (ess · (h + δ)))): m is the model's weights, h the
optimizer's Hessian estimate (its param group's `hess`), δ its `weight_decay` (the prior precision per example)
and ess the effective sample size. Each step draws `train_samples` weights from q (`IVON.sampled_params`),
averages their gradients and the reparameterisation estimate of the Hessian, and updates m and h.

The posterior of a run is written to `output_dir/posterior/` in the layout of a Fisher statistics folder
(`save_fisher`: fisher.safetensors, hessian/, stats.json), so that the merges take it wherever they take a
Fisher. It holds the precision divided by ess, h + δ: the Fisher files hold the squared gradients averaged over
the examples, and gradient matching multiplies each H_t by c_t, the data size: c_t H_t is the precision of the
posterior with ess = c_t, as c_t F_t is the Fisher summed over the data. An ess above the data size (the presets'
1e9, as the authors' recipes for transformers) tempers the posterior, whose noise 1/sqrt(ess · (h + δ)) would
otherwise wreck a pretrained transformer; h + δ stays a per-example precision, so c_t stays the data size.
"""
import dataclasses
import os

import ivon
import torch
from transformers import Seq2SeqTrainer, Trainer

from modelmerge import atomic
from modelmerge.config import ConfigError
from modelmerge.merging.provenance import model_provenance
from modelmerge.statistics.fisher import save_fisher

OPTIMIZER_FILE = "optimizer.pt"  # a Trainer checkpoint's optimizer state
POSTERIOR = "posterior"  # output_dir/posterior/: the posterior precision of best/
VARIANT = "ivon"  # the `variant` its files record (a Fisher's: sampled or empirical)
# AdamW's keys of train.py that IVON has no use for; each must keep its default with IVON.
ADAMW_ONLY_KEYS = {"adam_beta1": "ivon.beta1", "adam_beta2": "ivon.beta2", "max_grad_norm": "ivon.clip_radius"}


@dataclasses.dataclass
class IvonSpec:
    """The `ivon` keys of train.py (`optimizer_name: "IVON"`); learning_rate and weight_decay (IVON's prior
    precision δ) are train.py's own keys. Defaults are ivon-opt 0.1.3's."""

    hess_init: float = 1.0  # h at the start
    ess: float | None = None  # effective sample size; None: the number of training examples
    beta1: float = 0.9  # momentum of the gradient
    beta2: float = 0.99999  # of the Hessian estimate (short runs learn h only with a smaller one, e.g. 0.999)
    train_samples: int = 1  # weights drawn from q per step (each a forward and backward pass)
    eval_samples: int = 0  # 0: evaluate the posterior mean m; N: the average predicted probabilities of N draws
    clip_radius: float | None = None  # elementwise clipping of the preconditioned step; None: none

    def __post_init__(self):
        for key in ("hess_init", "ess", "clip_radius"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ConfigError(f"ivon.{key} must be positive, got {getattr(self, key)}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"ivon.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.train_samples < 1 or self.eval_samples < 0:
            raise ConfigError(f"ivon.train_samples must be at least 1 and ivon.eval_samples at least 0, got "
                              f"{self.train_samples} and {self.eval_samples}")


def check_training_config(config, defaults):
    """ConfigError where train.py's `config` mixes IVON with keys of another optimizer or a setting IVON lacks."""
    if config.optimizer_name != "IVON":
        if config.ivon is not None:
            raise ConfigError(f"ivon: IVON's keys given with optimizer_name {config.optimizer_name}; set optimizer_name "
                              "to IVON or drop them")
        return
    for key, replacement in ADAMW_ONLY_KEYS.items():
        if getattr(config, key) != defaults[key]:
            raise ConfigError(f"{key} is AdamW's, not used with optimizer_name IVON (its own is {replacement})")
    if config.gradient_accumulation_steps != 1:
        raise ConfigError("gradient_accumulation_steps must be 1 with optimizer_name IVON (each step draws its own "
                          "weights; raise per_device_train_batch_size instead)")
    if config.ivon.get("eval_samples") and config.task_type not in ("sequence_classification", "image_classification"):
        raise ConfigError(f"ivon.eval_samples averages class probabilities: task_type {config.task_type} has none")


class _IvonMixin:
    """Trainer methods for IVON: the optimizer, a training step over sampled weights, evaluation over draws."""

    def __init__(self, *args, ivon_spec, ess, **kwargs):
        super().__init__(*args, **kwargs)
        self.ivon_spec = ivon_spec
        self.ess = ess
        self.ivon = None

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            spec = self.ivon_spec
            trainable = [(n, p) for n, p in (model or self.model).named_parameters() if p.requires_grad]
            self.ivon = self.optimizer = ResumableIVON(
                trainable, lr=self.args.learning_rate, ess=self.ess, hess_init=spec.hess_init, beta1=spec.beta1,
                beta2=spec.beta2, weight_decay=self.args.weight_decay, mc_samples=spec.train_samples,
                clip_radius=float("inf") if spec.clip_radius is None else spec.clip_radius)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        losses = []
        for _ in range(self.ivon_spec.train_samples):
            with self.ivon.sampled_params(train=True):
                model.zero_grad()
                losses.append(super().training_step(model, inputs, num_items_in_batch))
                for group in self.ivon.param_groups:  # a parameter the loss does not reach has no gradient
                    for parameter in group["params"]:
                        if parameter.grad is None:
                            parameter.grad = torch.zeros_like(parameter)
        return torch.stack(losses).mean()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        draws = self.ivon_spec.eval_samples
        if not draws or self.ivon is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        probabilities = 0
        for _ in range(draws):
            with self.ivon.sampled_params():
                _, logits, labels = super().prediction_step(model, inputs, False, ignore_keys)
            probabilities = probabilities + logits.float().softmax(-1) / draws
        log_probabilities = probabilities.clamp_min(torch.finfo(torch.float32).tiny).log()
        loss = torch.nn.functional.nll_loss(log_probabilities, labels) if labels is not None else None
        return loss, None if prediction_loss_only else log_probabilities, labels


class IvonTrainer(_IvonMixin, Trainer):
    pass


class IvonSeq2SeqTrainer(_IvonMixin, Seq2SeqTrainer):
    pass


class ResumableIVON(ivon.IVON):
    """ivon.IVON whose state_dict also holds its step count (its momentum's bias correction 1 − β1^step needs it
    after resuming), and whose loaded m and h go to the device of its parameters (the Trainer loads checkpoints
    onto the CPU)."""

    def state_dict(self):
        return {**super().state_dict(), "current_step": self.current_step}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        current_step = state_dict.pop("current_step", 0)
        super().load_state_dict(state_dict)
        self.current_step = current_step
        for group in self.param_groups:
            for key in ("momentum", "hess"):
                group[key] = group[key].to(self._device, self._dtype)


@dataclasses.dataclass
class PosteriorPrecision:
    """What save_fisher writes (the fields of a FisherResult it reads): h + δ per trainable parameter."""

    fisher: dict  # named_parameters() name → h + δ, the parameter's shape
    num_examples: float  # ess: the precision is ess times `fisher`
    seed: int
    variant: str = VARIANT


def posterior_precision(model, optimizer_state, seed):
    """The posterior precision over ess, h + δ, of each parameter of `model` that the IVON `optimizer_state`
    (its state_dict, as a Trainer checkpoint saves it) describes."""
    parameters = dict(model.named_parameters())
    fisher, ess = {}, None
    for group in optimizer_state["param_groups"]:
        names = group.get("param_names")
        if names is None or "hess" not in group:
            raise RuntimeError("the optimizer state is not IVON's (no hess or param_names in its param groups)")
        if ess not in (None, group["ess"]):
            raise RuntimeError("the optimizer state's param groups have different ess")
        ess = group["ess"]
        precision = group["hess"].float() + group["weight_decay"]
        sizes = [parameters[name].numel() for name in names]
        if sum(sizes) != precision.numel():
            raise RuntimeError(f"the optimizer state's hess has {precision.numel()} entries for {sum(sizes)} parameters")
        for name, piece in zip(names, precision.split(sizes)):
            fisher[name] = piece.reshape(parameters[name].shape).clone()
    return PosteriorPrecision(fisher, ess, seed)


def write_posterior(model, checkpoint, model_folder, target, data_provenance, seed):
    """Write the posterior precision of `model` (trained by IVON, the weights of Trainer checkpoint `checkpoint`,
    exported to `model_folder`) to the statistics folder `target`, all at once; `data_provenance`: the training
    data's dataset and split (modelmerge.merging.provenance)."""
    state = torch.load(os.path.join(checkpoint, OPTIMIZER_FILE), map_location="cpu", weights_only=True)
    result = posterior_precision(model, state, seed)
    metadata = {**model_provenance(model_folder), **data_provenance}
    with atomic.atomic_dir(target) as tmp:
        save_fisher(result, model, tmp, metadata)
    return result
