"""Builds the demo collection's graph: blocks, aliases and outputs under the 'demo' subfolders."""
from sisyphus import gs, tk

from demo_pkg.numbers import Collect, Flaky, ListFiles, WriteNumbers, count_words, describe


def py():
    gs.ALIAS_AND_OUTPUT_SUBDIR = "demo"
    with tk.block("numbers"):
        numbers = WriteNumbers(5)
        numbers.add_alias("numbers")
        tk.register_output("numbers.txt", numbers.out_numbers)
        tk.register_output("description.txt", describe(numbers).out_text)
    with tk.block("files"):
        tk.register_output("collected.txt", Collect(ListFiles(3).out_list).out_text)
    tk.register_output("flaky.txt", Flaky("demo").out_text)
    tk.register_output("word_count", count_words().out_count)
