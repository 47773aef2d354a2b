"""The `sis` command line: `sis [--config FILE]... manager|m [-r] [-co] [-io] [-cio] [CONFIG...]` and
`sis worker JOBDIR TASK_NAME [TASK_ID]`. Run it in the setup directory (where settings.py is)."""
import argparse
import logging
import os
import sys
import time

EXIT_BAD_INPUT = 2


def main(argv=None):
    args = _parser().parse_args(argv)
    level = args.log_level_number if args.log_level_number is not None else getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, stream=sys.stderr, format="[%(asctime)s] %(levelname)s: %(message)s")
    from sisyphus.errors import SisError

    try:
        if args.command == "worker":
            return _worker(args)
        if args.command in ("console", "c"):
            return _console(args)
        return _manager(args)
    except SisError as e:
        logging.debug("details:", exc_info=True)
        print(f"sis: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("sis: interrupted; run the manager again to go on: tasks stopped with it resume where they can, "
              "and -cio runs the others (state interrupted_not_resumable) again", file=sys.stderr)
        return 130


def _parser():
    parser = argparse.ArgumentParser(prog="sis", description="Sisyphus-compatible workflow manager")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="config file to load (config/x.py calls its py(); config/x.f calls f()); repeatable")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log_level", dest="log_level_number", type=int, metavar="N",
                        help="log level as a number (10 debug, 20 info, 30 warning, 40 error), as upstream's sis")
    commands = parser.add_subparsers(dest="command", required=True)
    manager = commands.add_parser("manager", aliases=["m"], help="run the jobs the configs' outputs need")
    manager.add_argument("-r", "--run", action="store_true", help="run unattended, exit when nothing can progress")
    manager.add_argument("-co", dest="clear_errors", action="store_true", help="clear jobs in error state once")
    manager.add_argument("-cio", dest="clear_interrupts", action="store_true",
                         help="clear interrupted (not resumable) jobs once")
    manager.add_argument("-io", dest="ignore_errors", action="store_true",
                         help="do not ask whether to clear failed jobs")
    manager.add_argument("--http", type=int, metavar="PORT", help="serve a status page on http://127.0.0.1:PORT/")
    manager.add_argument("-i", "--interactive", action="store_true", help="ask before submitting each job")
    manager.add_argument("--ui", action="store_true",
                         help="terminal view: state counts, unfinished jobs and the latest log lines, redrawn")
    manager.add_argument("configs", nargs="*", metavar="CONFIG", help="further config files")
    console = commands.add_parser("console", aliases=["c"], help="load the configs and open a Python shell with "
                                  "the graph (tk, gs, graph, jobs, find_job, run_job, cleaner, ...)")
    console.add_argument("-c", "--command", dest="code", action="append", default=[],
                         help="run this Python code in the shell's namespace instead (repeatable)")
    console.add_argument("--skip_config", action="store_true", help="do not load the configs")
    console.add_argument("configs", nargs="*", metavar="CONFIG", help="further config files")
    worker = commands.add_parser("worker", help="run one task of one job (the engines call this)")
    worker.add_argument("jobdir")
    worker.add_argument("task_name")
    worker.add_argument("task_id", nargs="?", type=int)
    worker.add_argument("--engine", help="engine selector key the task was routed to")
    worker.add_argument("--redirect_output", action="store_true",
                        help="write stdout and stderr into the task's log file (log.<task>.<id>)")
    worker.add_argument("--force_resume", "--force-resume", "--fr", dest="force_resume", action="store_true",
                        help="run a task id in error state again (resume method if it has one)")
    return parser


def _manager(args):
    import sisyphus.toolkit as tk
    from sisyphus.manager import Manager

    start = time.perf_counter()
    loader = _load_configs(args)
    try:
        jobs = tk.sis_graph.jobs()
        logging.info("Loaded %s: %d jobs, %d outputs in %.2f s", " ".join(loader.loaded), len(jobs),
                     len(tk.sis_graph.outputs), time.perf_counter() - start)
        manager = Manager(tk.sis_graph, _engine(), loader, clear_errors=args.clear_errors,
                          clear_interrupts=args.clear_interrupts, ignore_errors=args.ignore_errors,
                          interactive=args.interactive, display=_display() if args.ui else None)
        server = _start_http(manager, args.http) if args.http is not None else None
        try:
            return manager.run(ask=not args.run)
        finally:
            if server is not None:
                server.shutdown()
    finally:
        loader.close()


def _display():
    from sisyphus.manager_ui import TerminalDisplay

    return TerminalDisplay()


def _start_http(manager, port):
    from sisyphus.errors import SisError
    from sisyphus.http_server import start_web_server

    try:
        server = start_web_server(manager, port)
    except OSError as e:
        raise SisError(f"--http {port}: cannot serve on this port: {e.strerror or e}") from e
    logging.info("Status page: http://127.0.0.1:%d/", server.server_address[1])
    return server


def _load_configs(args):
    """settings.py, then every config given; returns the loader."""
    import sisyphus.global_settings as gs
    import sisyphus.toolkit as tk
    from sisyphus.loader import ConfigLoader

    gs.load_settings(os.getcwd())
    configs = args.config + args.configs
    if not configs:
        configs = [_default_config()]
    tk._sis_running_in_manager = True
    loader = ConfigLoader()
    try:
        for config in configs:
            loader.load(config)
    except BaseException:
        loader.close()
        raise
    return loader


def _default_config():
    """Without a config argument, as upstream: config.py (its py()), else main() of the config package."""
    import sisyphus.global_settings as gs
    from sisyphus.errors import SisError

    if os.path.isfile(gs.CONFIG_FILE_DEFAULT):
        return gs.CONFIG_FILE_DEFAULT
    package, _, function = gs.CONFIG_FUNCTION_DEFAULT.rpartition(".")
    init = os.path.join(package.replace(".", os.sep), "__init__.py")
    if os.path.isfile(init):
        with open(init, encoding="utf-8") as f:
            if f"def {function}(" in f.read():
                return gs.CONFIG_FUNCTION_DEFAULT
    raise SisError(f"no config given: sis --config config/FILE.py m (or write {gs.CONFIG_FILE_DEFAULT}, or define "
                   f"{function}() in {init})")


def _console(args):
    """`sis console`: the graph of the configs in an interactive shell (IPython if installed); -c runs code."""
    import code

    import sisyphus.toolkit as tk
    from sisyphus.console import console_namespace

    import sisyphus.global_settings as gs
    from sisyphus.loader import ConfigLoader

    if args.skip_config:
        gs.load_settings(os.getcwd())
        loader = ConfigLoader()
    else:
        loader = _load_configs(args)
    gs.JOB_AUTO_CLEANUP = False  # as upstream: only `sis manager` packs job folders
    try:
        namespace = console_namespace()
        if args.code:
            for code_text in args.code:
                exec(compile(code_text, "<sis console -c>", "exec"), namespace)
            return 0
        banner = (f"Sisyphus console: {len(tk.sis_graph.jobs())} jobs, {len(tk.sis_graph.outputs)} outputs loaded. "
                  "Names: " + ", ".join(sorted(k for k in namespace if not k.startswith("_"))))
        try:
            import IPython
        except ImportError:
            code.interact(banner=banner, local=namespace, exitmsg="")
        else:
            print(banner)
            IPython.start_ipython(argv=[], user_ns=namespace, display_banner=False)
        return 0
    finally:
        loader.close()


def _worker(args):
    import sisyphus.global_settings as gs
    from sisyphus.worker import run_worker

    gs.load_settings(os.getcwd())
    return run_worker(args.jobdir, args.task_name, args.task_id, args.engine, force_resume=args.force_resume,
                      redirect_output=args.redirect_output)


def _engine():
    """gs.engine(), with any error in it as one line naming settings.py."""
    import sisyphus.global_settings as gs
    from sisyphus.errors import SisError

    try:
        return gs.engine()
    except Exception as e:
        raise SisError(f"{gs.GLOBAL_SETTINGS_FILE}: engine(): {type(e).__name__}: {e}") from e


if __name__ == "__main__":
    sys.exit(main())
