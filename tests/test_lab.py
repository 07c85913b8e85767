"""JupyterLab is part of the set-up: a real Jupyter server (JupyterLab's, on a free localhost
port, with a token) opens each notebook through its contents API, starts the registered
``latentlib`` kernel in a session for it, as JupyterLab does when a notebook is opened, and
runs the notebook's first code cells (the parameters and the imports) over the kernel's
websocket. No cell may fail, and the kernel must be the project's environment with
ipywidgets (tqdm's live bars) and no TqdmWarning."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from latentlib.pipeline import KERNEL, NOTEBOOKS, STAGES

PRESENT = [s for s in STAGES if (NOTEBOOKS / f"{s}.ipynb").exists()]
FIRST_CELLS = 2  # the parameters cell and the imports (with setup())
PROBE = ("import sys, tqdm.auto, tqdm.notebook, ipywidgets\n"
         "print(sys.prefix, issubclass(tqdm.auto.tqdm, tqdm.notebook.tqdm), ipywidgets.__version__)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, port: int, token: str, proc: subprocess.Popen, log: Path):
        self.base, self.token, self.proc, self.log = f"http://127.0.0.1:{port}", token, proc, log

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 30):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw and "json" in r.headers.get("Content-Type", "") else raw)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lab")
    port, token = _free_port(), secrets.token_hex(24)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp / "config"),
           "LATENTLIB_RUNS": str(tmp / "runs"), "LATENTLIB_REPORTS": str(tmp / "reports"),
           "OMP_NUM_THREADS": "1"}
    log = tmp / "server.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={NOTEBOOKS}", "--ServerApp.open_browser=False"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    srv = Server(port, token, proc, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the Jupyter server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if srv.request("GET", "/api/status", timeout=2)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Jupyter server did not answer in 60 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield srv
    finally:
        try:
            srv.request("POST", "/api/shutdown", timeout=10)
            proc.wait(timeout=20)
        except Exception:  # noqa: BLE001 - whatever happened, the server must not outlive the test
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_the_server_serves_jupyterlab_and_knows_the_latentlib_kernel(server):
    status, page = server.request("GET", "/lab")
    assert status == 200 and b"JupyterLab" in page
    _, specs = server.request("GET", "/api/kernelspecs")
    assert KERNEL in specs["kernelspecs"], (
        f"kernel {KERNEL!r} is not registered (found {sorted(specs['kernelspecs'])}): `make install` registers it")
    argv = specs["kernelspecs"][KERNEL]["spec"]["argv"]
    assert Path(argv[0]).parent == Path(sys.executable).parent, (
        f"the {KERNEL!r} kernel runs {argv[0]}, not this environment's python {sys.executable}")


async def _run_cells(server: Server, name: str, sources: list[str]) -> list[dict]:
    """Opens ``name`` in a session with the latentlib kernel and executes ``sources`` in
    order over the kernel's websocket; returns, per source, its reply status and outputs."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    loop = asyncio.get_running_loop()
    _, session = await loop.run_in_executor(None, lambda: server.request(
        "POST", "/api/sessions", {"path": name, "name": name, "type": "notebook", "kernel": {"name": KERNEL}}, 60))
    kernel_id, client_session = session["kernel"]["id"], uuid.uuid4().hex
    assert session["kernel"]["name"] == KERNEL
    url = server.base.replace("http", "ws") + f"/api/kernels/{kernel_id}/channels?session_id={client_session}"
    ws = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {server.token}"}))
    results = []
    try:
        for code in sources:
            msg_id = uuid.uuid4().hex
            ws.write_message(json.dumps({
                "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": client_session,
                           "username": "test", "version": "5.3", "date": ""},
                "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                            "allow_stdin": False, "stop_on_error": True}}))
            out = {"status": None, "outputs": [], "idle": False}
            while out["status"] is None or not out["idle"]:
                raw = await asyncio.wait_for(ws.read_message(), timeout=180)
                assert raw is not None, f"{name}: the kernel's websocket closed"
                msg = json.loads(raw)
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind = msg["header"]["msg_type"]
                if kind == "execute_reply":
                    out["status"] = msg["content"]["status"]
                elif kind == "status" and msg["content"]["execution_state"] == "idle":
                    out["idle"] = True
                elif kind in ("stream", "error", "execute_result", "display_data"):
                    out["outputs"].append({"type": kind, **msg["content"]})
            results.append(out)
    finally:
        ws.close()
        await loop.run_in_executor(None, lambda: server.request("DELETE", f"/api/sessions/{session['id']}"))
    return results


def test_each_notebook_opens_and_its_first_cells_run_in_the_latentlib_kernel(server):
    notebooks = {}
    for stage in PRESENT:
        status, model = server.request("GET", f"/api/contents/{stage}.ipynb?type=notebook&content=1")
        assert status == 200 and model["type"] == "notebook"
        code = [c for c in model["content"]["cells"] if c["cell_type"] == "code"][:FIRST_CELLS]
        assert "parameters" in code[0]["metadata"].get("tags", []), f"{stage}: its first code cell is not the parameters"
        notebooks[stage] = [c["source"] for c in code] + [PROBE]

    async def all_notebooks():
        return await asyncio.gather(*(_run_cells(server, f"{s}.ipynb", src) for s, src in notebooks.items()))

    t0 = time.perf_counter()
    ran = dict(zip(notebooks, asyncio.run(all_notebooks())))
    seconds = time.perf_counter() - t0
    for stage, cells in ran.items():
        for i, cell in enumerate(cells):
            errors = [o for o in cell["outputs"] if o["type"] == "error"]
            assert cell["status"] == "ok" and not errors, (
                f"{stage}, cell {i + 1}: {cell['status']}; " + "; ".join(f"{e['ename']}: {e['evalue']}" for e in errors))
            stderr = "".join(o.get("text", "") for o in cell["outputs"] if o.get("name") == "stderr")
            assert "TqdmWarning" not in stderr and "Traceback" not in stderr, f"{stage}, cell {i + 1}: {stderr[-2000:]}"
        probe = "".join(o.get("text", "") for o in cells[-1]["outputs"] if o.get("name") == "stdout").split()
        assert probe[0] == sys.prefix, f"{stage}: the kernel runs in {probe[0]}, not this environment {sys.prefix}"
        assert probe[1] == "True", f"{stage}: tqdm.auto is not tqdm.notebook's: progress bars would not be widgets"
    print(f"{len(ran)} notebooks, {FIRST_CELLS} cells each, in {seconds:.1f} s")
