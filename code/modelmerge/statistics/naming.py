"""The names statistics are saved under: those of the model's own checkpoint."""
from peft import PeftModel, get_peft_model_state_dict


def checkpoint_names(model):
    """Map each trainable parameter's `named_parameters()` name to its tensor name in the saved checkpoint.

    A transformers model saves its parameters under their own names (tied weights once, under the first name;
    buffers such as position ids are not parameters). A PEFT model saves only its adapter, under the names
    `get_peft_model_state_dict` gives (the adapter name removed: `...query.lora_A.weight`,
    `...classifier.weight` for a module to save).
    """
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    if not isinstance(model, PeftModel):
        return {name: name for name in trainable}
    state = model.state_dict()
    name_of = {id(tensor): name for name, tensor in state.items()}  # the PEFT function passes the tensors through
    saved = get_peft_model_state_dict(model, state_dict=state, save_embedding_layers=False)
    saved_as = {name_of[id(tensor)]: saved_name for saved_name, tensor in saved.items()}
    missing = [name for name in trainable if name not in saved_as]
    if missing:
        raise ValueError(f"trainable parameters that the PEFT adapter checkpoint does not hold: {missing}")
    return {name: saved_as[name] for name in trainable}
