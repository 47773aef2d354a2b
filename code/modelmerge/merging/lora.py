"""Planning a `lora-` merge: PEFT LoRA adapters merged as weight changes s·B·A (see modelmerge.lora_merge)."""
from modelmerge.io.formats import CheckpointError
from modelmerge.lora_merge import LoraDeltaView, ZeroView, adapter_name
from modelmerge.merging.options import MergeError
from modelmerge.merging.plan import LoraOutput, listing


def lora_inputs(method, adapters, base, lora_rank):
    """(views, base, rank of the output adapter or None when the changes go into `base`) of a lora- merge."""
    if base is not None and base.kind == "adapter":
        raise MergeError(f"a lora- merge needs the base model as ancestor, {base.path} is an adapter")
    try:
        views = [LoraDeltaView(adapter, base) for adapter in adapters]
    except CheckpointError as error:
        raise MergeError(str(error)) from None
    if len({view.fan_in_fan_out for view in views}) > 1:
        raise MergeError("the adapters disagree on fan_in_fan_out")
    if base is not None:
        return views, base, None
    for view in views[1:]:
        if set(view.pairs) != set(views[0].pairs):
            raise MergeError(f"the adapters {views[0].path} and {view.path} adapt different layers")
    zero = None
    if method.needs_base:
        full = sorted(views[0].others)
        if full:
            raise MergeError(
                f"method {method.name} needs an ancestor, and the adapters also hold full tensors ({listing(full)}) "
                "whose ancestor is unknown: give the base model as ancestor"
            )
        zero = ZeroView(views[0])  # the ancestor of a weight change is no change
    return views, zero, lora_rank or _largest_rank(views)


def _largest_rank(views):
    return max(view.adapter.info(a_name).shape[0] for view in views for a_name, _, _ in view.pairs.values())


def name_lora_outputs(tasks, view, rank):
    """Name the tasks' outputs as the adapter's: adapted layers become (A, B) pairs of rank `rank`."""
    for task in tasks:
        if task.name in view.pairs:
            module = adapter_name(task.name[: -len(".weight")])
            task.lora_output = LoraOutput(f"{module}.lora_A.weight", f"{module}.lora_B.weight", rank, view.fan_in_fan_out)
        else:
            task.name = adapter_name(task.name)
