"""Blocks: named groups of the jobs a config creates, shown as a tree on the web page (`tk.block`, `tk.sub_block`).

    with tk.block("training"):          # jobs created here belong to block 'training'
        ...
    @tk.block(cache=True)              # a function run in a block of its name, its result cached per arguments
    def build(x): ...

Blocks never change job ids.
"""
import inspect

#: Blocks that jobs created now are added to.
active_blocks = set()
#: Root blocks, one per loaded config.
all_root_blocks = []


class Block:
    def __init__(self, name, parents=None):
        self.name = name
        self.children = []  # jobs and blocks, in creation order
        self.parents = set() if parents is None else set(parents)
        self._job_ids = set()  # ids of the jobs among the children (membership in constant time)

    def __repr__(self):
        return f"<Block {self.name}>"

    def sub_block(self, name):
        child = Block(name, {self})
        self.children.append(child)
        return child

    def add_job(self, job):
        if job.job_id() not in self._job_ids:
            self._job_ids.add(job.job_id())
            self.children.append(job)

    def add_block(self, block):
        self.children.append(block)

    def jobs(self):
        return [child for child in self.children if not isinstance(child, Block)]

    def get_sub_blocks(self):
        return [child for child in self.children if isinstance(child, Block)]

    def empty(self):
        return not self.jobs() and all(b.empty() for b in self.get_sub_blocks())

    # Hashing a block (e.g. as part of a cached function's arguments) uses its name only.
    def __sis_state__(self):
        return self.name


def set_root_block(name):
    """Start a new root block (the manager does this for each config it loads)."""
    global active_blocks
    root = Block(name)
    active_blocks = {root}
    all_root_blocks.append(root)
    return root


def add_to_active_blocks(block):
    for parent in active_blocks:
        if parent not in block.parents:
            parent.add_block(block)
            block.parents.add(parent)


def sub_block(name):
    """A new block inside the active ones (not entered: use `with tk.block(name)` for that)."""
    new = Block(name)
    add_to_active_blocks(new)
    return new


class block:
    """`with block(name):` groups the jobs created inside; `@block()` / `@block(name, cache=True)` runs a function
    in a block named after it, with cache=True returning the cached result for equal arguments."""

    def __init__(self, name=None, cache=False):
        self.name = name
        self.cache = cache
        self._previous = []

    def __enter__(self):
        global active_blocks
        if self.name is None:
            raise ValueError("tk.block needs a name when used with `with`")
        current = Block(self.name)
        add_to_active_blocks(current)
        self._previous.append(active_blocks)
        active_blocks = {current}
        return current

    def __exit__(self, exc_type, exc_value, traceback):
        global active_blocks
        active_blocks = self._previous.pop()

    def __call__(self, function):
        name = self.name or function.__name__
        if not self.cache:
            def in_block(*args, **kwargs):
                with block(name):
                    return function(*args, **kwargs)
            return in_block

        from sisyphus.tools import sis_hash

        results = {}

        def cached(*args, **kwargs):
            key = sis_hash((function.__self__.__dict__, args, kwargs) if inspect.ismethod(function) else (args, kwargs))
            if key not in results:
                global active_blocks
                current = Block(name)
                previous, active_blocks = active_blocks, {current}
                try:
                    results[key] = function(*args, **kwargs), current
                finally:
                    active_blocks = previous
            result, current = results[key]
            add_to_active_blocks(current)
            return result

        return cached
