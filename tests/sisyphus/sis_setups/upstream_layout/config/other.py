"""A second config registering an output of the same name, kept apart by ALIAS_AND_OUTPUT_SUBDIR."""
from sisyphus import gs, tk

from demo_pkg.numbers import WriteNumbers


def py():
    gs.ALIAS_AND_OUTPUT_SUBDIR = "other"
    numbers = WriteNumbers(3)
    numbers.add_alias("numbers")
    tk.register_output("numbers.txt", numbers.out_numbers)
