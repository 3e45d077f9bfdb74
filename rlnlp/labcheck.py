"""Check the notebooks in a real JupyterLab, driven by headless Chromium.

    python -m rlnlp.labcheck                 # or: make lab-check
    python -m rlnlp.labcheck --out runs/lab-check --timeout 900
    python -m rlnlp.labcheck 00_tour.ipynb 05_erl_reflection.ipynb --run 05_erl_reflection.ipynb

Starts JupyterLab headless on a free localhost port (on copies of the notebooks, so nothing in
notebooks/ is modified), opens every notebook in headless Chromium through selenium, runs the tour
(00, and any notebook named with ``--run``) with "Run All Cells" in the smoke profile, and checks that

* every code cell ran (no cell left at ``[*]``) and no cell shows an error;
* every widget view rendered: no "Error displaying widget", none stuck at "Loading widget";
* the tour's figures appear as images, and the first widget slider of every notebook that was run and calls
  ``widgets.`` moves under the arrow keys;
* every other notebook opens and renders its markdown (and the committed figures it links).

Screenshots go to ``runs/lab-check/`` (one per notebook, plus the widget of each notebook that was run).
Needs JupyterLab, ipywidgets, selenium and Debian's ``chromium`` and ``chromium-driver``: missing Python packages are
installed with pip; missing browser packages are installed with apt-get when running as root, and
otherwise the one command that installs them is printed.
"""
from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .cli import Parser, UsageError, positive_int, run

ROOT = Path(__file__).resolve().parent.parent
PY_PACKAGES = {"selenium": "selenium>=4.10,<5", "jupyterlab": "jupyterlab>=4,<5", "ipywidgets": "ipywidgets>=8,<9"}
APT_COMMAND = "apt-get update && apt-get install -y chromium chromium-driver"
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1400,1000"]


LAB_SETTINGS = {
    # render every cell (JupyterLab 4 renders only the visible ones by default), so figures can be counted
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": '{"windowingMode": "none"}',
    # no "get notified about Jupyter news?" toast over the screenshots
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        '{"fetchNews": "false", "checkForUpdates": false}',
}


def ensure_dependencies() -> tuple[str, str]:
    """Install what is missing (pip packages; apt packages when root). Returns (chromium, chromedriver) paths."""
    missing = [spec for name, spec in PY_PACKAGES.items() if importlib.util.find_spec(name) is None]
    if missing:
        print(f"installing {' '.join(missing)} with pip", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
            print(f"installing the browser: {APT_COMMAND}", flush=True)
            subprocess.run(["bash", "-c", f"export DEBIAN_FRONTEND=noninteractive; {APT_COMMAND}"], check=True)
            browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
        if not (browser and driver):
            raise UsageError(f"headless Chromium is missing; install it with: sudo sh -c '{APT_COMMAND}'")
    return browser, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workspace(out: Path) -> Path:
    """A folder with copies of notebooks/ and the committed figures they link to (../visualizations/cpu/)."""
    root = out / "workspace"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(ROOT / "notebooks", root / "notebooks")
    if (ROOT / "visualizations" / "cpu").is_dir():
        shutil.copytree(ROOT / "visualizations" / "cpu", root / "visualizations" / "cpu")
    return root


def start_lab(root: Path, port: int, token: str, log: Path) -> subprocess.Popen:
    settings = root / ".lab-settings"
    for rel, body in LAB_SETTINGS.items():
        (settings / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings / rel).write_text(body)
    env = dict(os.environ, RLNLP_PROFILE="smoke", JUPYTER_CONFIG_DIR=str(root / ".jupyter-config"),
               JUPYTER_RUNTIME_DIR=str(root / ".jupyter-runtime"), JUPYTERLAB_SETTINGS_DIR=str(settings))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
           f"--LabApp.workspaces_dir={root / '.workspaces'}", "--LabApp.news_url=",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers often run as root
        cmd.append("--allow-root")
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {proc.returncode}; see {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"JupyterLab did not answer on port {port} within 120 s; see {log}")


def browser_session(browser: str, driver: str, profile_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in CHROME_FLAGS + [f"--user-data-dir={profile_dir}"]:
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


CURRENT = ".jp-NotebookPanel:not(.lm-mod-hidden) "
"""Scopes a selector to the notebook in front: the notebooks opened before stay in the page as hidden tabs."""


def _count(drv, css: str) -> int:
    from selenium.webdriver.common.by import By

    return len(drv.find_elements(By.CSS_SELECTOR, ", ".join(CURRENT + part.strip() for part in css.split(","))))


def _page_text(drv) -> str:
    return drv.execute_script("return document.body.innerText") or ""


def open_notebook(drv, base: str, name: str, token: str, timeout: float = 120) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    drv.get(f"{base}/lab/tree/notebooks/{name}?token={token}")
    WebDriverWait(drv, timeout).until(lambda d: _count(d, ".jp-Notebook .jp-Cell") > 0)
    WebDriverWait(drv, timeout).until(
        lambda d: "Idle" in _page_text(d) or _count(d, ".jp-Notebook-ExecutionIndicator[data-status='idle']"))
    time.sleep(2)  # markdown and images render after the cells exist


ERROR_OUTPUTS = """return [...document.querySelectorAll(arguments[0] +
    ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")]
    .filter(e => e.textContent.includes('Traceback (most recent call last)'));"""
"""Script: the error outputs of the notebook in front (JupyterLab 4 renders an exception as stderr text, like a
warning, so it is told apart by its traceback)."""
RUNNING_CELLS = """return [...document.querySelectorAll(arguments[0] + ".jp-CodeCell .jp-InputArea-prompt")]
    .filter(e => e.textContent.trim() === '[*]:');"""
"""Script: the prompts of the code cells still running or queued in the notebook in front."""


def _prompts(drv) -> list[str]:
    from selenium.webdriver.common.by import By

    return [p.text.strip() for p in drv.find_elements(By.CSS_SELECTOR, CURRENT + ".jp-CodeCell .jp-InputArea-prompt")]


def _click_run_all(drv) -> None:
    """Run > Run All Cells (the command runmenu:run-all), the notebook in front focused first."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    drv.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)  # close a menu a previous try left open
    prompts = drv.find_elements(By.CSS_SELECTOR, CURRENT + ".jp-CodeCell .jp-InputArea-prompt")
    if prompts:
        drv.execute_script("arguments[0].scrollIntoView({block: 'center'});", prompts[0])
        prompts[0].click()
    menu = next(e for e in drv.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item") if e.text.strip() == "Run")
    menu.click()
    item = "li.lm-Menu-item[data-command='runmenu:run-all']"  # the open menu lives outside the notebook panel
    WebDriverWait(drv, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, item))
    drv.find_element(By.CSS_SELECTOR, item).click()


def run_all(drv, timeout: float, tries: int = 3) -> list[str]:
    """Run All Cells, then wait until no prompt shows [*]: every cell ran, or execution stopped at an error (the
    cells after it stay unrun). A click that starts nothing within 30 s (it happens: the kernel not yet taking
    requests) is repeated, up to ``tries`` times. Returns what went wrong: execution that never started, the cells
    that never ran, or that it was still running after ``timeout`` seconds."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    started = lambda d: any(p == "[*]:" or p[1:2].isdigit() for p in _prompts(d))  # queued, running or ran
    for attempt in range(1, tries + 1):
        _click_run_all(drv)
        try:
            WebDriverWait(drv, 30, poll_frequency=1).until(started)
            break
        except TimeoutException:
            print(f"Run All Cells started nothing within 30 s (try {attempt} of {tries})", flush=True)
    else:
        return [f"Run All Cells started no cell in {tries} tries"]
    try:
        WebDriverWait(drv, timeout, poll_frequency=2).until(lambda d: (p := _prompts(d)) and "[*]:" not in p)
    except TimeoutException:
        return [f"still running after {timeout:.0f} s ({_prompts(drv).count('[*]:')} code cells at [*])"]
    time.sleep(3)  # widget views render after the kernel has answered
    unrun = [i for i, p in enumerate(_prompts(drv)) if p in ("", "[ ]:")]
    if unrun:
        return [f"{len(unrun)} code cells never ran (from code cell {unrun[0]} on): execution stopped"]
    return []


def scroll_to_first(drv, script: str) -> bool:
    """Scroll the first element ``script`` finds (``ERROR_OUTPUTS``, ``RUNNING_CELLS``) in the notebook in front into
    view; False when it finds none."""
    found = drv.execute_script(script, CURRENT)
    if found:
        drv.execute_script("arguments[0].scrollIntoView({block: 'center'});", found[0])
        time.sleep(1)
    return bool(found)


def problems(drv) -> list[str]:
    """What a reader would see as broken on the page."""
    text = _page_text(drv)
    found = []
    if "Error displaying widget" in text:
        found.append("a widget view failed: 'Error displaying widget'")
    if "Loading widget" in text:
        found.append("a widget view is stuck at 'Loading widget'")
    errors = len(drv.execute_script(ERROR_OUTPUTS, CURRENT))
    if errors:
        found.append(f"{errors} cell output(s) show an error")
    return found


def linked_figures(drv, wait: float = 20) -> tuple[int, list[str]]:
    """(how many images in markdown cells loaded, the sources of those that did not) after up to ``wait`` s."""
    from selenium.webdriver.common.by import By

    deadline = time.time() + wait
    while True:
        imgs = drv.find_elements(By.CSS_SELECTOR, CURRENT + ".jp-MarkdownCell img")
        if not imgs and time.time() < deadline - wait / 2:  # markdown may still be rendering
            time.sleep(1)
            continue
        state = [(img.get_attribute("src") or "",
                  drv.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img))
                 for img in imgs]
        broken = [src.rsplit("/", 1)[-1] for src, width in state if not width]
        if not broken or time.time() > deadline:
            return len(state) - len(broken), broken
        time.sleep(1)


def first_figure(drv) -> bool:
    """Scroll the first linked figure into view (for the screenshot); False when the notebook links none."""
    from selenium.webdriver.common.by import By

    imgs = drv.find_elements(By.CSS_SELECTOR, CURRENT + ".jp-MarkdownCell img")
    if not imgs:
        return False
    drv.execute_script("arguments[0].scrollIntoView({block: 'center'});", imgs[0])
    time.sleep(1)
    return True


def move_slider(drv, steps: int = 2) -> tuple[str, str, str]:
    """Focus the first widget slider's handle and press → ``steps`` times; returns its readout before and after,
    and its maximum (a slider over one position cannot move)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    handle = drv.find_element(By.CSS_SELECTOR, CURRENT + ".widget-slider .noUi-handle")
    readout = drv.find_element(By.CSS_SELECTOR, CURRENT + ".widget-slider .widget-readout")
    drv.execute_script("arguments[0].scrollIntoView({block: 'center'});", handle)
    before = readout.text or readout.get_attribute("textContent")
    handle.click()
    for _ in range(steps):
        handle.send_keys(Keys.ARROW_RIGHT)
        time.sleep(0.5)
    time.sleep(1)
    after = readout.text or readout.get_attribute("textContent")
    return before.strip(), after.strip(), (handle.get_attribute("aria-valuemax") or "").strip()


def calls_widgets(path: Path) -> bool:
    """Whether a notebook's code builds an ``rlnlp.widgets`` view."""
    import json

    return any("widgets." in "".join(c["source"]) for c in json.loads(path.read_text())["cells"]
               if c["cell_type"] == "code")


def check(out: Path, timeout: int, notebooks: list[str] | None = None, run_also: list[str] | None = None) -> int:
    browser, driver = ensure_dependencies()
    out.mkdir(parents=True, exist_ok=True)
    root = workspace(out)
    names = list(notebooks or []) or sorted(p.name for p in (root / "notebooks").glob("*.ipynb"))
    names += [n for n in run_also or [] if n not in names]
    to_run = {n for n in names if n.startswith("00")} | set(run_also or [])
    port, token = free_port(), secrets.token_hex(16)
    lab = start_lab(root, port, token, out / "jupyterlab.log")
    base = f"http://127.0.0.1:{port}"
    failures: list[str] = []
    profile_dir = Path(tempfile.mkdtemp(prefix="rlnlp-chromium-"))
    drv = None
    try:
        drv = browser_session(browser, driver, profile_dir)
        for name in names:
            stem = Path(name).stem
            open_notebook(drv, base, name, token)
            if name in to_run:
                t0 = time.time()
                stopped = run_all(drv, timeout)
                failures += [f"{name}: {p}" for p in stopped]
                images = _count(drv, ".jp-OutputArea-output img")
                widgets = _count(drv, ".jp-OutputArea-output .jupyter-widgets")
                print(f"{name}: {'stopped after' if stopped else 'ran every cell in'} {time.time() - t0:.0f} s; "
                      f"{images} figures, {widgets} widget views", flush=True)
                if stem.startswith("00") and images < 3:
                    failures.append(f"{name}: {images} figures rendered, expected at least 3")
                if stopped:  # show where it stopped: the first error, else the first cell still running
                    scroll_to_first(drv, ERROR_OUTPUTS) or scroll_to_first(drv, RUNNING_CELLS)
                drv.save_screenshot(str(out / f"{stem}-end.png"))
                if calls_widgets(root / "notebooks" / name) and not stopped:
                    if widgets < 1:
                        failures.append(f"{name}: no widget view rendered")
                    else:
                        before, after, top = move_slider(drv)
                        drv.save_screenshot(str(out / f"{stem}-widget.png"))
                        print(f"{name}: the first widget slider went from {before} to {after} (max {top}) under "
                              "two → presses", flush=True)
                        if before == after and top not in ("0", "0.0"):  # max 0: one position, nothing to move
                            failures.append(f"{name}: the first widget slider did not move ({before} -> {after})")
            else:
                drv.save_screenshot(str(out / f"{stem}.png"))
                rendered = _count(drv, ".jp-MarkdownCell .jp-RenderedMarkdown")
                figures, broken = linked_figures(drv)
                print(f"{name}: opened, {rendered} markdown cells rendered, {figures} linked figures loaded"
                      + (f", {len(broken)} broken: {broken}" if broken else ""), flush=True)
                if rendered == 0:
                    failures.append(f"{name}: no markdown cell rendered")
                if broken:
                    failures.append(f"{name}: linked figures that did not load: {broken}")
                shown = first_figure(drv)
                if shown:
                    drv.save_screenshot(str(out / f"{stem}-figure.png"))
            failures += [f"{name}: {p}" for p in problems(drv)]
    finally:
        if drv is not None:
            drv.quit()
        lab.terminate()
        try:
            lab.wait(20)
        except subprocess.TimeoutExpired:
            lab.kill()
        shutil.rmtree(profile_dir, ignore_errors=True)
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    print(f"lab-check: {len(names)} notebooks, {len(failures)} problem(s); screenshots in {out}")
    return 1 if failures else 0


def _main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m rlnlp.labcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "lab-check",
                        help="where screenshots and the lab log go")
    parser.add_argument("--timeout", type=positive_int, default=900,
                        help="seconds each notebook that is run may take (default 900)")
    parser.add_argument("notebooks", nargs="*", help="notebook file names (default: every notebook)")
    parser.add_argument("--run", action="append", default=[], metavar="NOTEBOOK",
                        help="also run this notebook (smoke profile) and check its widgets; repeatable "
                             "(the tour always runs)")
    args = parser.parse_args(argv)
    for name in args.notebooks + args.run:
        if not (ROOT / "notebooks" / name).is_file():
            raise UsageError(f"no notebook notebooks/{name}")
    try:
        return check(args.out, args.timeout, args.notebooks or None, args.run)
    except RuntimeError as err:  # the lab or the browser did not come up: one line, not a traceback
        print(f"lab-check: {err}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
