"""Which parameters statistics describe, and the names they are saved under: those of the model's checkpoint."""
import sys
from contextlib import contextmanager


def is_peft_model(model):
    """Whether `model` is a PEFT model, without importing peft for it (0.3 s and 9 MiB of every statistics program
    on a plain model): when peft has not been imported, no PEFT model exists."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def statistic_parameters(model):
    """Map the `named_parameters()` name of each parameter that statistics describe to its checkpoint name.

    For a PEFT model: the adapter's parameters (LoRA/IA3 weights and modules to save), whatever their
    `requires_grad` (`PeftModel.from_pretrained` loads them frozen), under the names of the adapter checkpoint
    (`get_peft_model_state_dict`: the adapter name removed, `...query.lora_A.weight`, `...classifier.weight`).
    For any other model: its trainable parameters, under their own names (tied weights once, under the first
    name; buffers such as position ids are not parameters).
    """
    if not is_peft_model(model):
        return checkpoint_names(model, [name for name, parameter in model.named_parameters() if parameter.requires_grad])
    from peft import get_peft_model_state_dict

    state = model.state_dict()
    name_of = {id(tensor): name for name, tensor in state.items()}  # the PEFT function passes the tensors through
    saved = get_peft_model_state_dict(model, state_dict=state, save_embedding_layers=False)
    saved_as = {name_of[id(tensor)]: saved_name for saved_name, tensor in saved.items()}
    return {name: saved_as[name] for name, _ in model.named_parameters() if name in saved_as}


def checkpoint_names(model, names):
    """name → the name `save_pretrained` writes it under: transformers 5 renames some modules on loading (ViT's
    `attention.attention.query` is `attention.q_proj` in memory) and back on saving. Tensors it would convert
    (not just rename) keep their in-memory name."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {name: name for name in names}
    parameters = dict(model.named_parameters())
    reverted = revert_weight_conversion(model, {name: parameters[name].detach() for name in names})
    by_storage = {(t.data_ptr(), tuple(t.shape)): saved for saved, t in reverted.items()}
    return {name: by_storage.get((parameters[name].data_ptr(), tuple(parameters[name].shape)), name) for name in names}


@contextmanager
def gradients_for_statistic_parameters(model):
    """Inside, exactly the statistic parameters require gradients; yields their names (`named_parameters()`).
    Every parameter's `requires_grad` is restored on exit."""
    if is_peft_model(model):
        names = set(statistic_parameters(model))
    else:  # statistic_parameters' names without their checkpoint names (a fixed cost of a few milliseconds)
        names = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    if not names:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    parameters = dict(model.named_parameters())
    before = {name: parameter.requires_grad for name, parameter in parameters.items()}
    try:
        for name, parameter in parameters.items():
            parameter.requires_grad_(name in names)
        yield names
    finally:
        for name, parameter in parameters.items():
            parameter.requires_grad_(before[name])
