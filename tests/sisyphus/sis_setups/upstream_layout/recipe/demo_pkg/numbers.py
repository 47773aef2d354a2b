"""Jobs that write, sum and describe numbers, using the reference Sisyphus API."""
import os

from sisyphus import Job, Task, setup_path, tk
from sisyphus.delayed_ops import DelayedFormat

# As i6_core/util.py does: paths relative to this package, hashed by package path (not by where the setup is).
Path = setup_path(__package__)


class WriteNumbers(Job):
    """Writes 1..count into <out_dir>/numbers.txt with a shell command, and their sum into a Variable."""

    def __init__(self, count):
        self.count = count
        self.out_dir = self.output_path("numbers", directory=True)
        self.out_numbers = self.out_dir.join_right("numbers.txt")
        self.out_total = self.output_var("total")
        self.set_vis_name(f"Write 1..{count}")

    def tasks(self):
        yield Task("run", mini_task=True)

    def run(self):
        self.sh("seq 1 {count} > {out_numbers}")
        with open(self.out_numbers.get_path()) as f:
            self.out_total.set(sum(int(line) for line in f))


class Describe(Job):
    """Writes a delayed text (a DelayedFormat of Variables) and a delayed number (Variable arithmetic)."""

    def __init__(self, text, number):
        self.text = text
        self.number = number
        self.out_text = self.output_path("text.txt")
        self.set_vis_name("Describe")

    def tasks(self):
        yield Task("run", mini_task=True)

    def run(self):
        with open(self.out_text.get_path(), "w") as f:
            f.write(f"{self.text.get()}; number={self.number.get()}; greeting={os.environ.get('DEMO_GREETING')}\n")


class ListFiles(Job):
    """Writes the names of `count` files it creates, one per line."""

    def __init__(self, count):
        self.count = count
        self.out_dir = self.output_path("files", directory=True)
        self.out_list = self.output_path("list.txt")

    def tasks(self):
        yield Task("run", mini_task=True)

    def run(self):
        names = []
        for i in range(self.count):
            name = os.path.join(self.out_dir.get_path(), f"file{i}.txt")
            with open(name, "w") as f:
                f.write(f"content {i}\n")
            names.append(name)
        with open(self.out_list.get_path(), "w") as f:
            f.write("\n".join(names) + "\n")


class Collect(Job):
    """Concatenates the files a list names; the files become inputs in update(), once the list exists."""

    def __init__(self, listing):
        self.listing = listing
        self.out_text = self.output_path("collected.txt")

    def update(self):
        with open(self.listing.get_path()) as f:
            for line in f.read().split():
                self.add_input(tk.Path(line))

    def tasks(self):
        yield Task("run", mini_task=True)

    def run(self):
        names = sorted(p.get_path() for p in self._sis_inputs if p != self.listing)
        with open(self.out_text.get_path(), "w") as f:
            for name in names:
                with open(name) as part:
                    f.write(part.read())


class Flaky(Job):
    """Fails on its first try (leaving a flag in DEMO_SETUP), succeeds on the second: Task(tries=2) reruns it."""

    def __init__(self, name):
        self.name = name
        self.out_text = self.output_path("flaky.txt")

    def tasks(self):
        yield Task("run", tries=2)

    def run(self):
        flag = os.path.join(os.environ["DEMO_SETUP"], f"flaky-{self.name}.tried")
        if not os.path.exists(flag):
            open(flag, "w").close()
            raise RuntimeError("first try fails")
        with open(self.out_text.get_path(), "w") as f:
            f.write("second try\n")


class CountLines(Job):
    """Counts the lines of a text file into a Variable."""

    def __init__(self, text):
        self.text = text
        self.out_count = self.output_var("count")

    def tasks(self):
        yield Task("run", mini_task=True)

    def run(self):
        with open(self.text.get_path()) as f:
            self.out_count.set(sum(1 for _ in f))


def count_words():
    return CountLines(Path("data/words.txt"))


def describe(numbers):
    """A Describe job over the numbers' total: text 'total=<t>', number 2*total+1."""
    total = numbers.out_total
    return Describe(DelayedFormat("total={}", total), total * 2 + 1)
