"""`sis m --http PORT`: a status page of the running manager, served from a background thread.

    /            jobs by state (vis name, aliases, outputs), registered outputs, failed tasks with their log tails;
                 the page reloads itself every few seconds while the manager runs
    /job/<id>    one job: state, folder, inputs, arguments and attributes (object_to_html), log tails
    /status.json the same data for scripts

The pages read the manager's state dictionaries; they never change anything.
"""
import html
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote

import sisyphus.global_settings as gs
from sisyphus.tools import tail

REFRESH_SECONDS = 3
LOG_TAIL_LINES = 20
_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.4em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
.state { font-weight: bold; padding: 1px 6px; border-radius: 3px; }
.finished { background: #c8f0c8; } .error, .retry_error, .interrupted_not_resumable { background: #f6b8b8; }
.running, .queue { background: #bcd8f6; } .runnable, .interrupted_resumable { background: #f6ecb8; }
.waiting, .hold { background: #e4e4e4; }
pre { background: #f6f6f6; padding: 6px; overflow-x: auto; font-size: 0.85em; }
"""


def object_to_html(obj, depth=0):
    """An HTML rendering of a job attribute: dicts as tables, lists as lists, paths and jobs by name."""
    from sisyphus.job import Job
    from sisyphus.job_path import AbstractPath

    if depth > 6:
        return html.escape(repr(obj)[:200])
    if isinstance(obj, Job):
        return f'<a href="/job/{quote(obj.job_id())}">{html.escape(obj.job_id())}</a>'
    if isinstance(obj, AbstractPath):
        creator = obj.creator_id()
        text = html.escape(obj.get_path())
        return f'<a href="/job/{quote(creator)}">{text}</a>' if creator else text
    if isinstance(obj, dict):
        rows = "".join(f"<tr><td>{object_to_html(k, depth + 1)}</td><td>{object_to_html(v, depth + 1)}</td></tr>"
                       for k, v in obj.items())
        return f"<table>{rows}</table>"
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return "<ul>" + "".join(f"<li>{object_to_html(item, depth + 1)}</li>" for item in items) + "</ul>"
    return html.escape(repr(obj))


class StatusPage:
    """Builds the pages from a Manager (sisyphus.manager.Manager)."""

    def __init__(self, manager):
        self.manager = manager

    def snapshot(self):
        """Jobs with their state, aliases, vis name and the outputs they make; outputs; failures with log tails."""
        from sisyphus.manager import FAILED_STATES, STATE_ORDER

        states = _copy(self.manager.states)
        outputs_by_job = {}
        outputs = []
        for name, path in sorted(self.manager.graph.outputs.items()):
            outputs_by_job.setdefault(path.creator_id(), []).append(name)
            outputs.append({"name": name, "path": path.get_path(),
                            "done": name in self.manager.linked_outputs})
        jobs = []
        for job, state in sorted(states.items(), key=lambda item: (STATE_ORDER.index(item[1]), item[0])):
            entry = {"id": job.job_id(), "state": state, "vis_name": job.get_vis_name(),
                     "aliases": sorted(job.get_aliases()), "outputs": outputs_by_job.get(job.job_id(), [])}
            if state in FAILED_STATES:
                entry["logs"] = self.log_tails(job)
            jobs.append(entry)
        return {"jobs": jobs, "outputs": outputs, "summary": self.manager.summary(), "running": not self.manager.done}

    def log_tails(self, job):
        current = _copy(self.manager.current).get(job)
        if current is None:
            return []
        task, ids = current
        return [{"task": f"{task.name()}.{i}", "state": state,
                 "tail": tail(task.file(gs.JOB_LOG, i), LOG_TAIL_LINES)} for i, state in sorted(ids.items())
                if state != gs.STATE_FINISHED]

    def overview(self):
        data = self.snapshot()
        refresh = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if data["running"] else ""
        parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'>{refresh}<title>Sisyphus status</title>"
                 f"<style>{_STYLE}</style></head><body><h1>Sisyphus: {html.escape(gs.BASE_DIR)}</h1>",
                 f"<p id='summary'>{html.escape(data['summary'])}"
                 f"{' (manager running)' if data['running'] else ' (manager stopped)'}</p>"]
        parts.append("<h2>Jobs</h2><table id='jobs'><tr><th>state</th><th>job</th><th>name</th><th>aliases</th>"
                     "<th>outputs</th></tr>")
        for job in data["jobs"]:
            parts.append(f"<tr class='job'><td><span class='state {job['state']}'>{job['state']}</span></td>"
                         f"<td><a href='/job/{quote(job['id'])}'>{html.escape(job['id'])}</a></td>"
                         f"<td>{html.escape(job['vis_name'] or '')}</td>"
                         f"<td>{html.escape(', '.join(job['aliases']))}</td>"
                         f"<td>{html.escape(', '.join(job['outputs']))}</td></tr>")
        parts.append("</table><h2>Outputs</h2><table id='outputs'>")
        for output in data["outputs"]:
            state = "finished" if output["done"] else "waiting"
            parts.append(f"<tr><td><span class='state {state}'>{'done' if output['done'] else 'pending'}</span></td>"
                         f"<td>{html.escape(output['name'])}</td><td>{html.escape(output['path'])}</td></tr>")
        parts.append("</table><h2>Errors</h2><div id='errors'>")
        failed = [job for job in data["jobs"] if "logs" in job]
        if not failed:
            parts.append("<p>none</p>")
        for job in failed:
            for log in job["logs"]:
                parts.append(f"<h3><span class='state {log['state']}'>{log['state']}</span> "
                             f"{html.escape(job['id'])} task {html.escape(log['task'])}</h3>"
                             f"<pre>{html.escape(log['tail'])}</pre>")
        parts.append("</div></body></html>")
        return "".join(parts)

    def job_page(self, job_id):
        job = next((j for j in self.manager.states if j.job_id() == job_id), None)
        if job is None:
            return None
        state = self.manager.states.get(job, "")
        attributes = {k: v for k, v in vars(job).items() if not k.startswith("_sis_")}
        info = job.info()
        fraction = job.completed_fraction()
        tails = "".join(f"<h3>log.{html.escape(log['task'])}</h3><pre>{html.escape(log['tail'])}</pre>"
                        for log in self.log_tails(job))
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(job_id)}</title>"
                f"<style>{_STYLE}</style></head><body><p><a href='/'>overview</a></p>"
                f"<h1>{html.escape(job_id)}</h1><p><span class='state {state}'>{state}</span> "
                f"{html.escape(job.get_vis_name() or '')}</p><p>folder: {html.escape(job._sis_path(abspath=True))}</p>"
                + (f"<p>info: {html.escape(str(info))}</p>" if info is not None else "")
                + (f"<p>completed: {100 * fraction:.0f} %</p>" if fraction is not None else "")
                + f"<h2>Inputs</h2>{object_to_html(sorted(job._sis_inputs))}"
                f"<h2>Arguments</h2>{object_to_html(job._sis_kwargs)}"
                f"<h2>Attributes</h2>{object_to_html(attributes)}{tails}</body></html>")


def _copy(mapping):
    """A copy of a dict the manager thread may be changing meanwhile."""
    for _ in range(10):
        try:
            return dict(mapping)
        except RuntimeError:  # changed size during the copy
            continue
    return {}


def start_web_server(manager, port, host="127.0.0.1"):
    """Serve the status pages of `manager` on host:port in a daemon thread; returns the server (shutdown() stops)."""
    page = StatusPage(manager)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = unquote(self.path.split("?")[0])
            if path in ("/", "/index.html"):
                self.reply(200, "text/html", page.overview())
            elif path == "/status.json":
                self.reply(200, "application/json", json.dumps(page.snapshot()))
            else:
                text = page.job_page(path[len("/job/"):]) if path.startswith("/job/") else None
                if text is None:
                    self.reply(404, "text/plain", f"not found: {path}")
                else:
                    self.reply(200, "text/html", text)

        def reply(self, status, content_type, text):
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", f"{content_type}; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # requests are not worth a log line each
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="sis-http", daemon=True).start()
    return server
