"""Keep finished work across the job-id change of the reproducible layout: rename `work/` job folders from
their old ids to the ids today's recipes give, and fix the links and paths that name them.

    python3 scripts/migrate_job_ids.py [--dry-run] [--old-data-dir DIR] CONFIG.py [CONFIG.py ...]

Run it from the setup directory (the folder holding settings.py and work/), with the manager stopped, and
give every config whose jobs you want to keep, e.g. `python3 scripts/migrate_job_ids.py config/example.py`.

What changed (and how the old id of each job of the loaded graph is computed from its arguments):
- the recipes moved from recipe/*.py to the package recipe/model_merging/ (old module path: `training`,
  new: `model_merging/training`); TrimmedModelJob is now TrimmedTaskVectorJob,
  model_merging's HuggingfaceSearchJob is EvaluationJob;
- the packaged offline model and the offline data are hashed by identity (package name and version; file
  content) instead of by absolute path: their old value is the model folder's path, and the data folder's
  old default `<setup dir>/../shared/data/sentiment` (`--old-data-dir` if it lay elsewhere).
The jobs read their inputs through those paths only, so a renamed folder holds exactly what the new job
would compute (the data jobs' copies of sst2 and rotten_tomatoes hold the full splits instead of the
shipped first rows; every job after them reads the same rows either way).

For each job whose old folder exists and whose new folder does not, the folder is renamed; then every
symbolic link under work/, alias/ and output/ that points into an old folder is pointed at the new one,
`input/` links are renamed, and small text files inside the moved folders (configs, run.sh, trainer
states) have the old folder paths replaced. Configs that wait for results (`async def py()`) are loaded
again after each round, so jobs built from migrated results are migrated too. Nothing is deleted.
"""
import argparse
import copy
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "recipe")]

import sisyphus.global_settings as gs  # noqa: E402
import sisyphus.toolkit as tk  # noqa: E402
from sisyphus.job import Job  # noqa: E402
from sisyphus.job_path import Path  # noqa: E402
from sisyphus.loader import ConfigLoader  # noqa: E402
from sisyphus.errors import SisError  # noqa: E402

from model_merging.stable_paths import CONTENT_PREFIX, identity  # noqa: E402

NEW_PACKAGE = "model_merging"
# Job classes renamed since: new name -> old name
OLD_CLASS_NAMES = {"TrimmedTaskVectorJob": "TrimmedModelJob", "EvaluationJob": "HuggingfaceSearchJob"}
TEXT_LIMIT = 4 * 1024 * 1024  # text files larger than this are left as they are (none of the pipeline's)


class _JobId:
    """Stands in for a Job argument: hashes as a job with this id."""

    def __init__(self, job_id):
        self.job_id = job_id

    def _sis_hash(self):
        return self.job_id.encode()


class LegacyIds:
    """The id each job of the graph had before the layout change."""

    def __init__(self, old_data_dir, shipped_data_dir):
        self.old_data_dir = old_data_dir
        self.shipped_data_dir = os.path.realpath(shipped_data_dir)
        self.cache = {}

    def __call__(self, job):
        known = self.cache.get(job.job_id())
        if known is None:
            cls = type(job)
            module = cls.__module__
            if module.startswith(NEW_PACKAGE + "."):
                module = module[len(NEW_PACKAGE) + 1:]
            known = self.cache[job.job_id()] = \
                f"{module.replace('.', '/')}/{OLD_CLASS_NAMES.get(cls.__name__, cls.__name__)}." \
                f"{cls.hash(self.old_arguments(job._sis_kwargs))}"
        return known

    def old_arguments(self, obj):
        if isinstance(obj, Job):
            return _JobId(self(obj))
        if isinstance(obj, Path):
            if identity(obj):
                return self.old_stable_path(obj)
            if isinstance(obj.creator, Job):
                old = copy.copy(obj)
                old.creator = self(obj.creator)  # a str creator hashes as that job id
                return old
            return obj
        if isinstance(obj, dict):
            return type(obj)((k, self.old_arguments(v)) for k, v in obj.items())
        if isinstance(obj, (list, tuple, set, frozenset)):
            return type(obj)(self.old_arguments(v) for v in obj)
        return obj

    def old_stable_path(self, path):
        """Before, these inputs were plain strings: the absolute path."""
        folder = path.get_path()
        if identity(path).startswith(CONTENT_PREFIX) and os.path.realpath(folder) == self.shipped_data_dir:
            return self.old_data_dir
        return folder


def load_jobs(loader, configs):
    for config in configs:
        loader.load(config)
    return {job.job_id(): job for job in tk.sis_graph.jobs()}


def plan(jobs, legacy, work):
    """[(old id, new id)] of the jobs whose old folder exists and whose new one does not."""
    moves = []
    for new_id, job in sorted(jobs.items()):
        old_id = legacy(job)
        if old_id == new_id:
            continue
        old, new = os.path.join(work, old_id), os.path.join(work, new_id)
        if os.path.isdir(old) and not os.path.lexists(new):
            moves.append((old_id, new_id))
        elif os.path.isdir(old):
            print(f"kept both: {new_id} exists already; {old_id} left as it is")
    return moves


def _replace_ids(text, base, moves):
    for old_id, new_id in moves:
        text = text.replace(os.path.join(base, gs.WORK_DIR, old_id) + os.sep, os.path.join(base, gs.WORK_DIR, new_id) + os.sep)
        text = re.sub(re.escape(os.path.join(base, gs.WORK_DIR, old_id)) + r"(?=$|[\s\"'])",
                      os.path.join(base, gs.WORK_DIR, new_id), text)
    return text


def fix_links(base, moves):
    """Point every link under work/, alias/ and output/ into a moved folder at its new place; rename input/ links."""
    renamed = {old.replace("/", "_"): new.replace("/", "_") for old, new in moves}
    for top in (gs.WORK_DIR, gs.ALIAS_DIR, gs.OUTPUT_DIR):
        for root, dirs, files in os.walk(os.path.join(base, top)):
            for name in dirs + files:
                link = os.path.join(root, name)
                if not os.path.islink(link):
                    continue
                target = os.readlink(link)
                absolute = os.path.normpath(os.path.join(root, target))
                new_target = _replace_ids(absolute, base, moves)
                new_link = link
                if os.path.basename(root) == gs.JOB_INPUT and name in renamed:
                    new_link = os.path.join(root, renamed[name])
                if new_target != absolute or new_link != link:
                    os.unlink(link)
                    if not os.path.lexists(new_link):
                        os.symlink(new_target if new_target != absolute else target, new_link)


def fix_text_files(base, moves):
    for _, new_id in moves:
        for root, _, files in os.walk(os.path.join(base, gs.WORK_DIR, new_id)):
            for name in files:
                path = os.path.join(root, name)
                if os.path.islink(path) or os.path.getsize(path) > TEXT_LIMIT:
                    continue
                try:
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                except (UnicodeDecodeError, OSError):
                    continue
                fixed = _replace_ids(text, base, moves)
                if fixed != text:
                    with open(path + ".migrate.tmp", "w", encoding="utf-8") as f:
                        f.write(fixed)
                    os.replace(path + ".migrate.tmp", path)


def migrate(configs, old_data_dir=None, dry_run=False, out=print):
    gs.load_settings(os.getcwd())
    base = gs.BASE_DIR
    work = os.path.join(base, gs.WORK_DIR)
    old_data_dir = old_data_dir or os.path.join(os.path.dirname(base), "shared", "data", "sentiment")
    legacy = LegacyIds(old_data_dir, getattr(gs, "DATA_DIR", "") or os.path.join(base, "data", "sentiment"))
    tk._sis_running_in_manager = True
    loader = ConfigLoader()
    done = []
    try:
        jobs = load_jobs(loader, configs)
        while True:
            moves = plan(jobs, legacy, work)
            if not moves:
                break
            for old_id, new_id in moves:
                out(f"{'would move' if dry_run else 'moved'}: {gs.WORK_DIR}/{old_id} -> {gs.WORK_DIR}/{new_id}")
            done += moves
            if dry_run:
                break
            for old_id, new_id in moves:
                os.makedirs(os.path.dirname(os.path.join(work, new_id)), exist_ok=True)
                os.rename(os.path.join(work, old_id), os.path.join(work, new_id))
                _remove_if_empty(os.path.dirname(os.path.join(work, old_id)))
            if not tk.sis_graph.resolve_waiters():
                break
            loader.step()  # async configs continue with the migrated results
            jobs = {job.job_id(): job for job in tk.sis_graph.jobs()}
    finally:
        loader.close()
    if done and not dry_run:  # once, with every move: a folder moved late may name one moved early
        fix_links(base, done)
        fix_text_files(base, done)
    out(f"{len(done)} job folder(s) {'to move' if dry_run else 'moved'}")
    left = sorted(set(old_layout_folders(work)) - {f"{gs.WORK_DIR}/{old_id}" for old_id, _ in done})
    if left:
        out(f"{len(left)} folder(s) of the old layout match no job of these configs (another config? the data "
            f"elsewhere than {old_data_dir}: --old-data-dir), e.g. {left[0]}")
    return done


def _remove_if_empty(folder):
    try:
        os.rmdir(folder)
    except OSError:  # not empty
        pass


def old_layout_folders(work):
    """Job folders under work/ in the old recipe layout (work/<module>/<Job>.<hash>)."""
    modules = ("data", "training", "statistics", "search", "merge", "report")
    return sorted(f"{gs.WORK_DIR}/{module}/{name}" for module in modules if os.path.isdir(os.path.join(work, module))
                  for name in os.listdir(os.path.join(work, module)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", metavar="CONFIG.py", help="configs whose jobs to migrate")
    parser.add_argument("--old-data-dir", help="where the offline data lay before (default: ../shared/data/sentiment)")
    parser.add_argument("--dry-run", action="store_true", help="only print what would be moved")
    args = parser.parse_args(argv)
    try:
        migrate(args.configs, args.old_data_dir, args.dry_run)
    except SisError as e:
        print(f"migrate_job_ids: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
