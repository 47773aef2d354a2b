"""Job ids against the hash format of ../shared/docs/sisyphus.md, with expected bytes written out by hand."""
import collections
import enum
import hashlib
import os
import subprocess
import sys

import pytest

from sis_util import REPO
from sisyphus import Job, Task, tk
from sisyphus.hash import HashError, short_hash, sis_hash_helper

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def base62_of_sha256(data):
    """The contract's short hash, written independently of sisyphus.hash: 12 base-62 digits, lowest first."""
    number = int(hashlib.sha256(data).hexdigest(), 16)
    digits = ""
    for _ in range(12):
        digits += ALPHABET[number % 62]
        number //= 62
    return digits


class Demo(Job):
    __module__ = "recipe.demo.jobs"  # as if defined in recipe/demo/jobs.py

    def __init__(self, text, n=3):
        self.text = text
        self.n = n
        self.out = self.output_path("out.txt")


class Options(Job):
    __module__ = "recipe.demo.jobs"
    __sis_hash_exclude__ = {"verbose": False}

    def __init__(self, settings, verbose=False, **extra):
        self.settings = settings
        self.verbose = verbose
        self.extra = extra


class Versioned(Job):
    __module__ = "recipe.demo.jobs"
    __sis_version__ = 2

    def __init__(self, text):
        self.text = text


class WithRqmt(Job):
    __module__ = "recipe.demo.jobs"

    def __init__(self, text, mem_rqmt=4):
        self.text = text
        self.mem_rqmt = mem_rqmt

    @classmethod
    def hash(cls, parsed_args):
        return super().hash({k: v for k, v in parsed_args.items() if k != "mem_rqmt"})


class OutsideRecipes(Job):
    __module__ = "mylib.steps"

    def __init__(self, text):
        self.text = text


def helper_of_dict(items):
    """helper() of a dict of str keys, built by hand: sorted helper bytes of its (key, value) tuples."""
    return b"(dict, " + b", ".join(sorted(b"(tuple, (str, '" + k.encode() + b"'), " + v + b")"
                                          for k, v in items.items())) + b")"


def test_helper_bytes_of_simple_values():
    assert sis_hash_helper(("a", 1)) == b"(tuple, (str, 'a'), (int, 1))"
    assert sis_hash_helper(None) == b"(NoneType)"
    assert sis_hash_helper(True) == b"(bool, True)"
    assert sis_hash_helper(1.5) == b"(float, 1.5)"
    assert sis_hash_helper(b"raw") == b"(bytes, raw)"
    assert sis_hash_helper([1, "x"]) == b"(list, (int, 1), (str, 'x'))"
    assert sis_hash_helper({3, 1}) == b"(set, (int, 1), (int, 3))"
    assert sis_hash_helper({"b": 1, "a": [2]}) == (
        b"(dict, (tuple, (str, 'a'), (list, (int, 2))), (tuple, (str, 'b'), (int, 1)))")
    assert sis_hash_helper(base62_of_sha256) == b"(function, (tuple, (str, 'test_sis_hash'), (str, 'base62_of_sha256')))"


class Point:
    def __init__(self):
        self.x = 1


class Color(enum.Enum):
    RED = 1


Pair = collections.namedtuple("Pair", "a b")


def test_helper_of_objects_enums_namedtuples():
    assert sis_hash_helper(Point()) == b"(Point, (dict, (tuple, (str, 'x'), (int, 1))))"
    # The enum member's attributes without _sort_order_ (added in Python 3.11), as in older Pythons.
    state = helper_of_dict({"_value_": b"(int, 1)", "_name_": b"(str, 'RED')",
                            "__objclass__": sis_hash_helper(Color)})
    assert sis_hash_helper(Color.RED) == b"(Color, " + state + b")"

    # A namedtuple: (its __getnewargs__(), its attributes), and it has none of its own (__slots__ is empty).
    assert sis_hash_helper(Pair(1, 2)) == b"(Pair, (tuple, (tuple, (int, 1), (int, 2)), (dict)))"


def test_long_helper_output_is_replaced_by_its_digest():
    value = "x" * 5000
    inner = b"(str, '" + value.encode() + b"')"
    assert sis_hash_helper(value) == hashlib.sha256(inner).digest()
    assert sis_hash_helper([value]) == b"(list, " + hashlib.sha256(inner).digest() + b")"


def test_short_hash_is_base62_of_sha256():
    assert short_hash(("a", 1)) == base62_of_sha256(b"(tuple, (str, 'a'), (int, 1))")


def test_job_id_from_arguments_with_defaults_filled_in():
    expected = base62_of_sha256(helper_of_dict({"text": b"(str, 'hello')", "n": b"(int, 3)"}))
    assert Demo("hello").job_id() == f"demo/jobs/Demo.{expected}"
    assert expected == "sCRDiBk5DydE"  # known id: computed once by hand from the format above
    assert Demo(text="hello", n=3) is Demo("hello")  # same arguments: same job object
    assert Demo("hello", n=4) is not Demo("hello")


def test_job_id_with_path_of_another_job():
    first = Demo("hello")
    path_bytes = b"(Path, (tuple, (str, 'demo/jobs/Demo.sCRDiBk5DydE/output'), (str, 'out.txt')))"
    assert sis_hash_helper(first.out) == path_bytes
    second = Demo(first.out)
    assert second.job_id() == "demo/jobs/Demo." + base62_of_sha256(
        helper_of_dict({"text": path_bytes, "n": b"(int, 3)"}))
    assert second.job_id() == "demo/jobs/Demo.UVel9dGypS64"


def test_path_without_creator_and_nested_dicts():
    job = Demo({"data": tk.Path("data/train.jsonl"), "cfg": {"lr": 0.1, "layers": [1, 2]}})
    path_bytes = b"(Path, (tuple, (NoneType), (str, 'data/train.jsonl')))"
    cfg = helper_of_dict({"lr": b"(float, 0.1)", "layers": b"(list, (int, 1), (int, 2))"})
    text = helper_of_dict({"data": path_bytes, "cfg": cfg})
    assert job.job_id() == "demo/jobs/Demo." + base62_of_sha256(helper_of_dict({"text": text, "n": b"(int, 3)"}))


def test_hash_exclude_kwargs_version_and_override():
    settings = b"(str, 's')"
    assert Options("s").job_id() == "demo/jobs/Options." + base62_of_sha256(
        helper_of_dict({"settings": settings, "extra": b"(dict)"}))
    assert Options("s", verbose=True).job_id() == "demo/jobs/Options." + base62_of_sha256(
        helper_of_dict({"settings": settings, "verbose": b"(bool, True)", "extra": b"(dict)"}))
    assert Options("s", depth=2).job_id() == "demo/jobs/Options." + base62_of_sha256(
        helper_of_dict({"settings": settings, "extra": helper_of_dict({"depth": b"(int, 2)"})}))

    versioned = b"(tuple, " + helper_of_dict({"text": b"(str, 'v')"}) + b", (int, 2))"
    assert Versioned("v").job_id() == "demo/jobs/Versioned." + base62_of_sha256(versioned)

    assert WithRqmt("t", mem_rqmt=8) is WithRqmt("t", mem_rqmt=2)
    assert WithRqmt("t").job_id() == "demo/jobs/WithRqmt." + base62_of_sha256(helper_of_dict({"text": b"(str, 't')"}))
    assert OutsideRecipes("t").job_id().startswith("mylib/steps/OutsideRecipes.")


def test_ids_of_the_reference_implementations_own_test_suite():
    """rwth-i6/sisyphus tests/job_unittest.py pins ids made with md5 instead of SHA-256 (same helper bytes) for
    its recipe `task/test.py`: Test(text=...) with one output out_text.gz. The same bytes must give them here."""

    class Test(Job):
        __module__ = "recipe.task.test"

        def __init__(self, text=None):
            self.text = text
            self.out = self.output_path("out_text.gz")

        @classmethod
        def hash(cls, parsed_args):
            value = parsed_args if cls.__sis_version__ is None else (parsed_args, cls.__sis_version__)
            return hashlib.md5(sis_hash_helper(value)).hexdigest()

    job = Test(text="input_text.gz")
    assert job.job_id() == "task/test/Test.f744898e46ca9452ff1889edc988d045"
    job = Test(text=Test(text=job.out).out)
    assert job.job_id() == "task/test/Test.a4ce523976aa98f9fca9d9956bbfdffa"
    assert Test(text=job.out).job_id() == "task/test/Test.a14422432288985538db5a4be40a44aa"
    Test.__sis_version__ = 1
    assert Test(text="input_text.gz").job_id() == "task/test/Test.4efda2530a66c6d8973f0991996ad9a7"


def test_ids_are_equal_across_processes_with_different_hash_seeds():
    code = ("import sys; sys.path[:0] = ['tests', 'tests/sisyphus']; import test_sis_hash as t; "
            "print(t.Demo({'s': frozenset({'a', 'b', 'c'}), 'd': {'x': 1, 'y': 2}}).job_id())")
    ids = set()
    for seed in ("1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=REPO)
        ids.add(subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                               check=True).stdout.strip())
    assert len(ids) == 1
    assert ids == {Demo({"s": frozenset({"a", "b", "c"}), "d": {"x": 1, "y": 2}}).job_id()}


def test_unhashable_arguments_are_refused_naming_the_argument():
    with pytest.raises(HashError, match="argument 'text' of recipe.demo.jobs.Demo: a lambda function"):
        Demo(lambda x: x)

    def from_main():
        pass

    from_main.__module__ = "__main__"
    with pytest.raises(HashError, match="argument 'n' .*function .*from_main is defined in __main__"):
        Demo("t", n=from_main)

    class Local:
        pass

    Local.__module__ = "__main__"
    with pytest.raises(HashError, match="class .*Local is defined in __main__"):
        Demo(Local)

    class Items(list):
        pass

    with pytest.raises(HashError, match="argument 'text' .*subclass of a built-in container"):
        Demo(Items([1]))


def test_task_arguments_are_not_part_of_the_job_hash():
    class Steps(Job):
        __module__ = "recipe.demo.jobs"

        def __init__(self, text):
            self.text = text
            self.rqmt = {"cpu": 2}

        def tasks(self):
            yield Task("run", rqmt=self.rqmt)

    assert Steps("t").job_id() == "demo/jobs/Steps." + base62_of_sha256(helper_of_dict({"text": b"(str, 't')"}))
