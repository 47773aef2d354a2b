"""The data-aware merge Jobs (RegMean++, AdaMerging) write the command lines of their programs."""
from model_merging.merge import AdaMergingJob, RegMeanPlusPlusJob
from test_recipes import _create_files, setup_dir  # noqa: F401  (setup_dir is a fixture)


def test_regmean_plusplus_job_command(setup_dir):  # noqa: F811
    job = RegMeanPlusPlusJob(["/a", "/b"], ["/da", "/db"], "train", alpha=0.9, num_examples=32)
    assert _create_files(job, setup_dir).split()[1:] == [
        "/project/code/regmean_plusplus.py", "--models", "/a", "/b", "--datasets", "/da", "/db", "--split", "train",
        "--num_examples", "32", "--batch_size", "16", "--max_length", "128", "--alpha", "0.9",
        "--output", job.out_model.get_path()]


def test_adamerging_job_command(setup_dir):  # noqa: F811
    job = AdaMergingJob("/base", ["/a", "/b"], ["/da", "/db"], iterations=50, gpu_rqmt=1)
    command = _create_files(job, setup_dir).split()
    assert command[1:4] == ["/project/code/adamerging.py", "--ancestor", "/base"]
    assert command[-4:] == ["--device", "cuda", "--output", job.out_model.get_path()]
    assert "--iterations" in command and command[command.index("--iterations") + 1] == "50"
    assert AdaMergingJob("/base", ["/a", "/b"], ["/da", "/db"], iterations=50, gpu_rqmt=0) is job  # resources not hashed
