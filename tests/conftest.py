import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from several threads, and tests run programs side by side on 2 cores: one
# thread per process (torch reads this when first imported, after this file).
os.environ.setdefault("OMP_NUM_THREADS", "1")


# --- SLURM: tests marked `slurm` need a cluster that answers `sinfo` (.ci/run starts one) ---
import subprocess  # noqa: E402

import pytest  # noqa: E402

CI_SLURM_CONF = "/tmp/sis-ci-slurm/slurm.conf"  # written by `bash .ci/slurm.sh start`
if "SLURM_CONF" not in os.environ and os.path.exists(CI_SLURM_CONF):
    os.environ["SLURM_CONF"] = CI_SLURM_CONF


def _why_no_slurm():
    """None when `sinfo` answers, else the reason to skip."""
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    if not os.path.exists(conf):  # sinfo would retry for a minute
        return f"no SLURM cluster: no {conf} (bash .ci/slurm.sh install && bash .ci/slurm.sh start)"
    try:
        result = subprocess.run(["sinfo", "--noheader"], capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        return "no SLURM cluster: `sinfo` is not installed (bash .ci/slurm.sh install && bash .ci/slurm.sh start)"
    except subprocess.TimeoutExpired:
        return "no SLURM cluster: `sinfo` did not answer within 20 s"
    if result.returncode != 0:
        return f"no SLURM cluster answers `sinfo` (bash .ci/slurm.sh start): {result.stderr.strip()}"
    return None


def pytest_collection_modifyitems(config, items):
    slurm_tests = [item for item in items if "slurm" in item.keywords]
    reason = _why_no_slurm() if slurm_tests else None
    for item in slurm_tests if reason else []:
        item.add_marker(pytest.mark.skip(reason=reason))


# --- the tiny model of every family and rows of their tasks (tests/programs/test_families.py and
# tests/statistics/test_family_statistics.py) ---


@pytest.fixture(scope="module")
def family_paths(tmp_path_factory):
    from tiny import FAMILY_MODELS

    root = tmp_path_factory.mktemp("families")
    return {name: make(str(root / name), seed=2) for name, make in FAMILY_MODELS.items()}


@pytest.fixture(scope="module")
def text_rows():
    from tiny import word_tasks

    return word_tasks(10, seed=1, kind="reverse")


@pytest.fixture(scope="module")
def image_rows(tmp_path_factory):
    from tiny import colour_images

    return colour_images(str(tmp_path_factory.mktemp("images") / "train"), per_class=3)


@pytest.fixture
def deterministic_draws(monkeypatch):
    """Replace DELLA's random keep decisions, ours and mergekit's, by the same rule (keep where p ≥ 0.5) so that
    everything else DELLA computes can be compared exactly."""
    import torch

    from modelmerge.methods import della

    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: (p >= 0.5).to(p.dtype))
    monkeypatch.setattr(della, "draw", lambda p, generator, out=None: (p >= 0.5) if out is None else out.copy_(p >= 0.5))


@pytest.fixture
def merge_help(capsys):
    """What `code/merge.py --help` prints."""
    import merge as merge_program

    with pytest.raises(SystemExit):
        merge_program.parse_args(["--help"])
    return capsys.readouterr().out


@pytest.fixture
def restore_threads():
    """Torch's thread count as it was before the test, whatever the test sets."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def record_threads(monkeypatch):
    """record(method_class): the merge programs merge with `method_class`, noting torch's thread count at each
    merge in the list record returns."""
    import torch

    from modelmerge.merging import frontend

    def record(method_class):
        seen = []

        class Recording(method_class):
            def merge(self, group, **params):
                seen.append(torch.get_num_threads())
                return super().merge(group, **params)

        monkeypatch.setattr(frontend, "load_method", lambda name: Recording())
        return seen

    return record
