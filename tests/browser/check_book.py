"""Browser check of the built book: `make check-book` (or python tests/browser/check_book.py).

Serves _build/html on a free localhost port, drives headless Chromium (selenium, /usr/bin/chromium
and /usr/bin/chromedriver from the Debian packages chromium and chromium-driver) through every page
reachable from index.html, with every request that is not to localhost blocked (host names other
than localhost do not resolve, and anything else goes to a proxy that does not exist), as a reader
without a network would see it, and checks on each:

- no request left localhost and none failed (Chromium's performance log: every request the page
  made, its answer or its failure), so every script, style sheet and font comes from the book;
- every formula is typeset: MathJax (served from _static/mathjax/) loaded and finished, no
  `.math` element left without its rendering, and no raw `\(`, `\[` or `$$` left in the text
  outside code;

- every <img> loaded (complete, naturalWidth > 0): no broken image, every figure rendered;
- every internal link answers 200, and its #fragment exists on the target page;
- no error in a cell output: no stderr/traceback/error output area, no "Traceback" or "...Error"
  in an output;
- no unresolved text: no leftover `{glue...}`, `{cite...}`, `{doc}` role, no docutils
  "problematic" or "system-message" node;
- notebook pages offer a download of their .ipynb (it exists) and a Colab link to the same
  notebook's path under _sources/ (what gh-pages will hold);
- the attention viewer (where a page has one) responds to a hover: dispatching mouseover on a
  token changes the shading of the tokens and fills the info line;
- no uncaught JavaScript error from the book's own pages (other console errors are printed as
  notes; a failed request fails through the check above).

A full-page screenshot of each page goes to _build/screenshots/ (and one of each viewer, hovered).
Exit status 1 when any check fails, with one line per problem.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import re
import socketserver
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1000",
         # offline: no host name but localhost (127.0.0.1) resolves, and what does not need a name (an IP
         # address) goes to a proxy on a closed port; only loopback bypasses the proxy
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
         "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=localhost;127.0.0.1"]
LOCAL_SCHEMES = ("data:", "blob:", "about:", "chrome:", "chrome-extension:", "devtools:")
UNTYPESET = r"\\\(|\\\[|\$\$"  # raw TeX delimiters: \( \[ $$ (a JavaScript regular expression)
UNRESOLVED = re.compile(r"\{(glue|glue:\w+|cite|cite:\w+|doc|ref|numref|eq|download)\}`")
ERROR_TEXT = re.compile(r"Traceback \(most recent call last\)|\b[A-Z]\w*Error\b")
MAX_SHOT_HEIGHT = 16000
# Known and harmless: sphinx-thebe 0.3.1 (pulled in by jupyter-book 1.0.4) declares its config
# constants twice on every page; thebe is not used by this book.
KNOWN_JS_ERRORS = ("Identifier 'THEBE_JS_URL' has already been declared",)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # the browser hung up (next page)
            super().handle_error(request, client_address)


def serve(root: Path) -> tuple[socketserver.TCPServer, str]:
    handler = functools.partial(QuietHandler, directory=str(root))
    server = QuietServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='catchtag-chromium-')}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    return driver


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def screenshot(driver, path: Path) -> None:
    """A full-page PNG (capped at MAX_SHOT_HEIGHT pixels): the window is made as tall as the page."""
    height = driver.execute_script("return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
    driver.set_window_size(1280, min(int(height) + 140, MAX_SHOT_HEIGHT))
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.2)
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 1000)


JS_IMAGES = """
return Array.from(document.images).map(i => [i.currentSrc || i.src, i.complete, i.naturalWidth]);
"""
JS_LINKS = "return Array.from(document.querySelectorAll('a[href]')).map(a => a.href);"
JS_IDS = "return Array.from(document.querySelectorAll('[id]')).map(e => e.id);"
JS_OUTPUT_ERRORS = """
const bad = [];
const areas = document.querySelectorAll('.output.stderr, .output.traceback, .output.error, .cell_output .traceback');
if (areas.length) {
  const first = areas[0].querySelector('pre') || areas[0];
  bad.push(areas.length + ' stderr/error output area(s), the first: ' +
           JSON.stringify(first.textContent.trim().replace(/\s+/g, ' ').slice(0, 160)));
}
document.querySelectorAll('.cell_output').forEach(e => {
  const m = e.textContent.match(new RegExp(arguments[0]));
  if (m) bad.push('cell output contains ' + JSON.stringify(m[0]) + ': ' + e.textContent.trim().slice(0, 120));
});
return bad;
"""
JS_HOVER = """
const root = arguments[0];
const toks = root.querySelectorAll('.ct-tok');
const target = toks[toks.length - 1];
const before = Array.from(toks).map(t => t.style.backgroundColor);
target.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
const after = Array.from(toks).map(t => t.style.backgroundColor);
const changed = after.filter((c, i) => c !== before[i]).length;
return {n: toks.length, changed: changed, info: root.querySelector('.ct-info').textContent,
        catcher: root.querySelectorAll('.ct-catcher').length, query: target.classList.contains('ct-query')};
"""


JS_MATHJAX_DONE = """
const done = arguments[arguments.length - 1];
const n = document.querySelectorAll('.math').length;
if (!window.MathJax || !MathJax.startup || !MathJax.startup.promise) { done({n: n, state: 'not loaded'}); return; }
MathJax.startup.promise.then(() => done({n: n, state: 'ok'}), e => done({n: n, state: 'failed: ' + e}));
"""
JS_UNTYPESET = """
const re = new RegExp(arguments[0]);
const bad = [];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
while (walker.nextNode()) {
  const node = walker.currentNode, el = node.parentElement;
  if (!el || el.closest('pre, code, script, style, textarea, mjx-container, .highlight')) continue;
  const m = node.textContent.match(re);
  if (m) bad.push(node.textContent.slice(Math.max(0, m.index - 40), m.index + 80).replace(/\\s+/g, ' ').trim());
}
const bare = Array.from(document.querySelectorAll('.math')).filter(e => !e.querySelector('mjx-container')).length;
return {bad: bad, bare: bare};
"""


def local(url: str, base: str) -> bool:
    return url.startswith(base) or url.startswith(LOCAL_SCHEMES)


def network_problems(driver, base: str, where: str) -> list[str]:
    """What Chromium's performance log holds since the last call: every request that was not to the
    book's server, every request that failed (a navigation cancelled by the next page aside) and
    every answer 400 or above."""
    urls: dict[str, str] = {}
    problems: list[str] = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            urls[params["requestId"]] = url = params["request"]["url"]
            if not local(url, base):
                problems.append(f"{where} request to outside the book: {url[:160]}")
        elif method == "Network.responseReceived":
            response = params["response"]
            if response["url"] == base + "favicon.ico":
                continue  # asked for by the browser itself; the book declares none
            if response.get("status", 0) >= 400 and local(response["url"], base):
                problems.append(f"{where} request {response['url']} answered {response['status']}")
        elif method == "Network.loadingFailed":
            url = urls.get(params["requestId"], "(a request of an earlier page)")
            if params.get("canceled") or params.get("errorText") == "net::ERR_ABORTED":
                continue  # navigation to the next page
            if local(url, base) or url.startswith("("):
                problems.append(f"{where} failed request {url[:160]}: {params.get('errorText')}")
    return problems


def math_problems(driver, where: str) -> list[str]:
    """Formulas left as raw TeX, or MathJax missing where a page has formulas."""
    problems = []
    state = driver.execute_async_script(JS_MATHJAX_DONE)
    if state["n"] and state["state"] != "ok":
        problems.append(f"{where} {state['n']} formula(s) but MathJax {state['state']}")
    found = driver.execute_script(JS_UNTYPESET, UNTYPESET)
    if found["bare"]:
        problems.append(f"{where} {found['bare']} formula(s) not typeset by MathJax")
    if found["bad"]:
        problems.append(f"{where} {len(found['bad'])} text(s) with raw TeX, the first: {found['bad'][0]!r}")
    return problems


def check(html_dir: Path, shots: Path) -> list[str]:
    problems: list[str] = []
    shots.mkdir(parents=True, exist_ok=True)
    for old in shots.glob("*.png"):
        old.unlink()
    server, base = serve(html_dir)
    driver = browser()
    ids: dict[str, set[str]] = {}
    fragments: list[tuple[str, str, str]] = []  # (from page, target page, fragment)
    todo, seen, noted = [base + "index.html"], set(), set()
    try:
        driver.get("about:blank")  # what the browser loaded at start (its new-tab page) is not the book's
        driver.get_log("performance")
        driver.get_log("browser")
        while todo:
            url = todo.pop(0)
            if url in seen:
                continue
            seen.add(url)
            page = urlparse(url).path.lstrip("/") or "index.html"
            t0 = time.time()
            driver.get(url)
            time.sleep(0.3)  # let inline scripts run
            where = f"[{page}]"
            # formulas (first, so that MathJax has finished before anything else is read)
            problems.extend(math_problems(driver, where))
            n_math = driver.execute_script("return document.querySelectorAll('mjx-container').length")
            # images
            for src, complete, width in driver.execute_script(JS_IMAGES):
                if not complete or not width:
                    problems.append(f"{where} broken image {src}")
            n_img = len(driver.execute_script(JS_IMAGES))
            # links
            for href in driver.execute_script(JS_LINKS):
                if not href.startswith(base):
                    continue
                target, frag = urldefrag(href)
                if status(target) != 200:
                    problems.append(f"{where} broken link {href}")
                    continue
                if frag:
                    fragments.append((page, target, unquote(frag)))
                if target.endswith(".html") and target not in seen and target not in todo:
                    todo.append(target)
            ids[url] = set(driver.execute_script(JS_IDS))
            # outputs and unresolved text
            for msg in driver.execute_script(JS_OUTPUT_ERRORS, ERROR_TEXT.pattern):
                problems.append(f"{where} {msg}")
            text = driver.find_element("tag name", "body").text
            for m in UNRESOLVED.finditer(driver.page_source):
                problems.append(f"{where} unresolved role text {m.group(0)!r}")
            for m in re.finditer(r"\{glue[^}]*\}", text):
                problems.append(f"{where} unresolved glue {m.group(0)!r}")
            n_bad = driver.execute_script(
                "return document.querySelectorAll('.problematic, .system-message').length")
            if n_bad:
                problems.append(f"{where} {n_bad} unresolved reference(s) (docutils 'problematic')")
            # notebook pages: download and Colab
            is_nb = bool(driver.execute_script(
                "return document.querySelector('.cell, .cell_output') !== null"))
            links = driver.execute_script(JS_LINKS)
            downloads = [h for h in links if h.endswith(".ipynb") and h.startswith(base)]
            colab = [h for h in links if h.startswith("https://colab.research.google.com/github/")]
            if is_nb and page.startswith("book/"):
                if not downloads:
                    problems.append(f"{where} no .ipynb download link")
                for h in downloads:
                    if status(h) != 200:
                        problems.append(f"{where} .ipynb download {h} does not exist")
                if not colab:
                    problems.append(f"{where} no Colab launch link")
                for h in colab:
                    m = re.search(r"/blob/[^/]+/(.+\.ipynb)$", h)
                    if not m or not (html_dir / m.group(1)).is_file():
                        problems.append(f"{where} Colab link {h} does not point to a published .ipynb")
            # the attention viewer
            for k, root in enumerate(driver.find_elements("css selector", ".catchtag-viewer")):
                driver.execute_script("arguments[0].scrollIntoView()", root)
                r = driver.execute_script(JS_HOVER, root)
                if not (r["changed"] > 0 and r["info"] and r["query"]):
                    problems.append(f"{where} viewer {k} does not respond to a hover: {r}")
                root.screenshot(str(shots / f"{page.replace('/', '__').removesuffix('.html')}__viewer{k}.png"))
            # JavaScript errors
            for entry in driver.get_log("browser"):
                if entry.get("level") != "SEVERE":
                    continue
                msg = entry.get("message", "")
                if any(k in msg for k in KNOWN_JS_ERRORS):
                    continue
                if msg.startswith(base) and "Uncaught" in msg:  # (failed requests: network_problems)
                    problems.append(f"{where} JavaScript error: {msg[:200]}")
                elif msg.split(" ")[0] not in noted:
                    noted.add(msg.split(" ")[0])
                    print(f"  note {where}: {msg[:160]} (not counted as a failure)")
            screenshot(driver, shots / (page.replace("/", "__").removesuffix(".html") + ".png"))
            # requests: every one made while the page was open (read last, so late loads count)
            problems.extend(network_problems(driver, base, where))
            print(f"  {page:<40} {n_img:3d} images {n_math:4d} formulas  {time.time() - t0:5.1f} s", flush=True)
        for page, target, frag in fragments:
            if target in ids and frag not in ids[target]:
                problems.append(f"[{page}] link to {urlparse(target).path}#{frag}: no such anchor")
    finally:
        driver.quit()
        server.shutdown()
    if len(seen) < 2:
        problems.append("fewer than two pages reachable from index.html")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", nargs="?", default="_build/html", type=Path)
    parser.add_argument("--screenshots", default="_build/screenshots", type=Path)
    args = parser.parse_args(argv)
    if not (args.html / "index.html").exists():
        print(f"error: {args.html}/index.html not found: build the book first (make book)", file=sys.stderr)
        return 2
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not Path(exe).exists():
            print(f"error: {exe} not found: apt-get install -y chromium chromium-driver", file=sys.stderr)
            return 2
    print(f"[check-book] {args.html} in headless Chromium; screenshots in {args.screenshots}/")
    problems = check(args.html, args.screenshots)
    for p in problems:
        print("FAIL", p)
    print(f"[check-book] {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
