"""Disk cleanup: pack finished job folders (finished.tar.gz, as gs.JOB_AUTO_CLEANUP does), remove job folders the
graph no longer needs (`tk.cleaner`), remove jobs and what depends on them (`tk.remove_job_and_descendants`),
import finished jobs of other work directories (`tk.import_work_directory`).

Nothing is deleted without a confirmation, and a job whose task is running (its lock is held or its worker
process lives) is never touched.
"""
import fcntl
import logging
import os
import shutil
import tarfile

import sisyphus.global_settings as gs
from sisyphus.job import Job
from sisyphus.job_path import AbstractPath
from sisyphus.tools import remove_stale_temporaries, temporary_prefix

logger = logging.getLogger("sisyphus.cleanup")


def archive_job_folder(folder):
    """Pack a finished job folder: everything but output/, info and work/ goes into finished.tar.gz (written under
    a temporary name, then renamed), then is removed; work/ is removed unless gs.JOB_CLEANUP_KEEP_WORK.
    Returns False (and does nothing) for a folder that is not finished, already packed, or has a running task."""
    marker = os.path.join(folder, gs.JOB_FINISHED_MARKER)
    archive = os.path.join(folder, gs.JOB_FINISHED_ARCHIVE)
    if not os.path.isfile(marker) or os.path.exists(archive) or job_folder_running(folder):
        return False
    remove_stale_temporaries(folder)
    keep = {gs.JOB_OUTPUT, gs.JOB_INFO, gs.JOB_WORK_DIR}
    names = sorted(name for name in os.listdir(folder) if name not in keep)
    tmp = os.path.join(folder, temporary_prefix("." + gs.JOB_FINISHED_ARCHIVE) + "tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for name in names:
            tar.add(os.path.join(folder, name), arcname=name)
    os.replace(tmp, archive)
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    if not gs.JOB_CLEANUP_KEEP_WORK:
        shutil.rmtree(os.path.join(folder, gs.JOB_WORK_DIR), ignore_errors=True)
    logger.info("packed %s into %s", os.path.relpath(folder, gs.BASE_DIR), gs.JOB_FINISHED_ARCHIVE)
    return True


def job_folder_running(folder):
    """True if a task of the job folder runs: a worker holds one of its lock files."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return False
    for name in names:
        if not name.startswith(gs.TASK_LOCK + "."):
            continue
        with open(os.path.join(folder, name), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock, fcntl.LOCK_UN)
    return False


def job_folders(work_dir):
    """Every job folder under `work_dir`: a folder holding job.save or finished.tar.gz (not searched further)."""
    found = []
    for root, dirs, files in os.walk(work_dir):
        if gs.JOB_SAVE in files or gs.JOB_FINISHED_ARCHIVE in files:
            found.append(root)
            dirs[:] = []
        else:
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    return sorted(found)


def _apply(folders, mode, what):
    """List the folders, then (mode 'remove'/'move', after a yes) delete them or move them to <setup>/trash/."""
    folders = [f for f in folders if not job_folder_running(f)]
    if not folders:
        print(f"No {what}.")
        return []
    print(f"{what.capitalize()} ({len(folders)}):")
    for folder in folders:
        print("  " + os.path.relpath(folder, gs.BASE_DIR))
    if mode == "dryrun":
        return folders
    answer = input(f"{'Delete' if mode == 'remove' else 'Move to trash/'} these {len(folders)} folders? (y/N) ")
    if answer.strip().lower() not in ("y", "yes"):
        print("Nothing changed.")
        return []
    for folder in folders:
        if job_folder_running(folder):  # started meanwhile
            continue
        if mode == "remove":
            shutil.rmtree(folder)
        else:
            target = os.path.join(gs.BASE_DIR, "trash", os.path.relpath(folder, os.path.join(gs.BASE_DIR, gs.WORK_DIR)))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(folder, target)
    return folders


def _check_mode(mode):
    if mode not in ("dryrun", "move", "remove"):
        raise ValueError(f"mode must be 'dryrun', 'move' or 'remove', not {mode!r}")


def cleaner(graph, clean_job_dir=False, clean_work_dir=False, mode="dryrun", keep_value=0,
            only_remove_current_graph=False):
    """See tk.cleaner. Returns the folders removed (or, in dryrun, those that would be)."""
    _check_mode(mode)
    jobs = graph.jobs()
    in_graph = {os.path.normpath(job._sis_path(abspath=True)) for job in jobs}
    candidates = []
    if clean_work_dir and not only_remove_current_graph:
        work_dir = os.path.join(gs.BASE_DIR, gs.WORK_DIR)
        candidates += [f for f in job_folders(work_dir) if os.path.normpath(f) not in in_graph]
    if keep_value > 0:
        needed = set()  # jobs an unfinished job of the graph still needs
        for job in jobs:
            if not job._sis_finished():
                needed.update(p.creator for p in job._sis_inputs if isinstance(p.creator, Job))
        for job in jobs:
            value = job.keep_value()
            value = gs.JOB_DEFAULT_KEEP_VALUE if value is None else value
            if value < keep_value and job not in needed and job._sis_setup() and job._sis_finished():
                candidates.append(job._sis_path(abspath=True))
    removed = _apply(sorted(set(candidates)), mode, "job folders not needed by the graph")
    if clean_job_dir:
        finished = [job._sis_path(abspath=True) for job in jobs if job._sis_setup() and job._sis_finished()]
        for folder in finished:
            if mode == "dryrun":
                print("would pack " + os.path.relpath(folder, gs.BASE_DIR))
            elif folder not in removed:
                archive_job_folder(folder)
    return removed


def remove_job_and_descendants(graph, jobs, mode="remove"):
    """See tk.remove_job_and_descendants. Returns the folders removed (dryrun: that would be)."""
    _check_mode(mode)
    if isinstance(jobs, (str, AbstractPath, Job)):
        jobs = [jobs]
    sources = set()
    for item in jobs:
        if isinstance(item, AbstractPath):
            item = item.creator
        if isinstance(item, Job):
            sources.add(item.job_id())
        elif isinstance(item, str):
            path = os.path.relpath(os.path.abspath(item), os.path.join(gs.BASE_DIR, gs.WORK_DIR))
            sources.update(job.job_id() for job in graph.jobs() if path == job.job_id() or
                           path.startswith(job.job_id() + os.sep))
        else:
            raise TypeError(f"remove_job_and_descendants needs Jobs, Paths or job folders, not {item!r}")
    affected = set(sources)
    changed = True
    while changed:  # every job with an input made by an affected job is affected
        changed = False
        for job in graph.jobs():
            if job.job_id() not in affected and any(p.creator_id() in affected for p in job._sis_inputs):
                affected.add(job.job_id())
                changed = True
    folders = [os.path.join(gs.BASE_DIR, gs.WORK_DIR, job_id) for job_id in sorted(affected)]
    return _apply([f for f in folders if os.path.isdir(f)], mode, "job folders depending on the given jobs")


def import_work_directory(graph, directories, mode="dryrun"):
    """See tk.import_work_directory. Returns the job ids imported (dryrun: importable)."""
    if mode not in ("dryrun", "copy", "symlink"):
        raise ValueError(f"mode must be 'dryrun', 'copy' or 'symlink', not {mode!r}")
    imported = []
    for job in graph.jobs():
        if job._sis_setup():
            continue
        for directory in directories:
            source = os.path.join(directory, job.job_id())
            if not (os.path.isfile(os.path.join(source, gs.JOB_FINISHED_MARKER)) or
                    os.path.isfile(os.path.join(source, gs.JOB_FINISHED_ARCHIVE))):
                continue
            target = job._sis_path(abspath=True)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if mode == "copy":
                shutil.copytree(source, target, symlinks=True)
            elif mode == "symlink":
                os.symlink(os.path.abspath(source), target, target_is_directory=True)
            print(f"{mode}: {source} -> {os.path.relpath(target, gs.BASE_DIR)}")
            imported.append(job.job_id())
            break
    return imported
