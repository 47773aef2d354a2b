"""The task-data arguments both data-aware merge programs take (modelmerge.merging.cli.add_task_data_arguments):
each program keeps its own defaults, one --split serves every data set, and bad counts or sizes are one-line
usage errors (exit status 2)."""
import adamerging
import pytest
import regmean_plusplus

PROGRAMS = {
    "adamerging": (adamerging, ["--ancestor", "p"], "validation", 64),
    "regmean_plusplus": (regmean_plusplus, [], "train", 256),
}


@pytest.mark.parametrize("name", PROGRAMS)
def test_defaults_and_one_split_for_all(name):
    program, leading, split, num_examples = PROGRAMS[name]
    args = program.parse_args([*leading, "--models", "a", "b", "c", "--datasets", "x", "y", "z", "--output", "o"])
    assert args.split == [split] * 3
    assert (args.num_examples, args.batch_size, args.max_length) == (num_examples, 16, 128)
    args = program.parse_args([*leading, "--models", "a", "b", "--datasets", "x", "y", "--split", "test",
                               "validation", "--output", "o"])
    assert args.split == ["test", "validation"]


@pytest.mark.parametrize("name", PROGRAMS)
@pytest.mark.parametrize("arguments, message", [
    (["--models", "a", "b", "--datasets", "x"], "--datasets: got 1 for 2 models"),
    (["--models", "a", "b", "--datasets", "x", "y", "--split", "s", "t", "u"], "--split: give one split for all"),
    (["--models", "a", "--datasets", "x", "--max_length", "0"], "must be at least 1"),
])
def test_bad_task_data_is_one_usage_line(name, arguments, message, capsys):
    program, leading, _, _ = PROGRAMS[name]
    with pytest.raises(SystemExit) as exit_info:
        program.parse_args([*leading, *arguments, "--output", "o"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
