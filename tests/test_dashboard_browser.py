"""The dashboard in a real browser (issue 20): Debian's Chromium, driven by Selenium, against the example
system under ``micro run`` (one system and one browser for the module).

Each test saves a screenshot (PNG) in its own output directory; the README shows two of them
(docs/img/dashboard-services.png, docs/img/dashboard-run.png).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
MICRO = [sys.executable, "-m", "micro.cli"]
CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"
WAIT = 30  # seconds a page may take to show what a test waits for

EXTRA = '''
import msgspec
import micro

class Hello(msgspec.Struct):
    name: str

class Greeter:
    async def Greet(self, req: Hello) -> Hello:
        """Says hello."""
        return Hello(name=f"hello {req.name}")

extra = micro.New("extra-greeter")
extra.handle(Greeter())
'''


def _start(args: list[str], env: dict[str, str], ready: str) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen([*MICRO, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=ROOT)
    assert proc.stdout is not None
    seen: list[str] = []
    for line in proc.stdout:
        seen.append(line)
        if ready in line:
            return proc, seen
    proc.wait(10)
    pytest.fail(f"micro {' '.join(args)} exited early:\n" + "".join(seen))


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert proc.stdout is not None
    rest = proc.stdout.read()
    proc.stdout.close()
    return rest


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("dashboard-home")
    return {**os.environ, "MICRO_HOME": str(home), "MICRO_BROKER": "local://", "DASH_TOKEN": "s3cret-token"}


@pytest.fixture(scope="module")
def system(env: dict[str, str]) -> Iterator[str]:
    """The example system under ``micro run``, its dashboard on a free port; yields the dashboard's URL."""
    proc, seen = _start(["run", "examples/tasks", "--http-address", "127.0.0.1:0"], env, "Ctrl-C to stop")
    urls = [m.group(1) for line in seen if (m := re.match(r"dashboard: (http://\S+)", line))]
    assert len(urls) == 1, "".join(seen)
    yield urls[0]
    # a page left open: its live stream must neither hold micro run up nor end as a broken response
    host, port = urls[0].removeprefix("http://").split(":")
    rest = None
    try:
        with socket.create_connection((host, int(port)), timeout=WAIT) as live:
            live.sendall(f"GET /ui/events/services HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            got = b""
            while b"event: services" not in got and (chunk := live.recv(65536)):
                got += chunk
            assert got.startswith(b"HTTP/1.1 200") and b"event: services" in got
            rest = _stop(proc)  # with the page still open
            while chunk := live.recv(65536):
                got += chunk
            assert got.endswith(b"0\r\n\r\n"), got[-200:]  # the stream ended as a whole response
    finally:
        if rest is None:
            rest = _stop(proc)
    assert "stopped" in rest and "ASGI callable returned without completing" not in rest, rest


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,800",
                 "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def _wait(driver: WebDriver, what: object, message: str) -> object:
    # an element read while the page navigates (a form's POST, then its redirect) may be gone: read again.
    # Chromium reports some of those reads as an "unhandled inspector error" (the node left the document)
    # rather than a stale element; only that one is read again, any other driver error fails the test.
    def attempt(d: WebDriver) -> object:
        try:
            return what(d)  # type: ignore[operator]
        except WebDriverException as e:
            if "does not belong to the document" in str(e.msg):
                return False
            raise

    wait = WebDriverWait(driver, WAIT, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
    return wait.until(attempt, message)


def _table(driver: WebDriver) -> list[list[str]]:
    """[name, kind] per row of the service table, read at once (the live table may be swapped any time)."""
    rows: list[list[str]] = driver.execute_script(
        "return [...document.querySelectorAll('tr[data-service]')]"
        ".map(tr => [tr.dataset.service, tr.querySelector('.kind').textContent])")
    return rows


def _rows(driver: WebDriver) -> list[str]:
    return [name for name, _ in _table(driver)]


def test_the_service_list_shows_the_example_and_follows_the_registry(system: str, browser: WebDriver,
                                                                       env: dict[str, str], tmp_path: Path) -> None:
    browser.get(system + "/")
    rows = _rows(browser)
    assert {"task", "project", "milestone", "notification", "email", "user", "workspace", "task-mgr",
            "project-mgr", "comms-mgr", "onboard-user", "close-task"} <= set(rows)
    assert rows.index("task") < rows.index("task-mgr") < rows.index("close-task")  # services, agents, flows
    kinds = dict(_table(browser))
    assert kinds["task"] == "service" and kinds["task-mgr"] == "agent" and kinds["close-task"] == "flow"
    # each node's own health check: every node of the example serves (the local broker's delivery node too)
    health = browser.execute_script(
        "return [...document.querySelectorAll('tr[data-service] .node')]"
        ".map(e => [e.closest('tr').dataset.service, e.querySelector('.health').textContent])")
    assert {name for name, _ in health} == set(rows), health
    assert {state for _, state in health} == {"serving"}, health
    browser.save_screenshot(str(tmp_path / "services.png"))
    browser.set_window_size(390, 844)  # a phone's width: nothing wider than the screen
    try:
        # the resize reaches the page's layout a moment later: wait for it, then nothing may be wider
        _wait(browser, lambda d: d.execute_script("return window.innerWidth") <= 390, "the window did not narrow")
        _wait(browser, lambda d: d.execute_script("return document.documentElement.scrollWidth") <= 390,
              "the page is wider than a phone's screen")
        browser.save_screenshot(str(tmp_path / "services-phone.png"))
    finally:
        browser.set_window_size(1280, 800)
    # live: a service that starts elsewhere appears without a reload, and goes when it stops
    app = tmp_path / "extra.py"
    app.write_text(EXTRA)
    proc, _ = _start(["run", str(app), "--no-http"], env, "Ctrl-C to stop")
    try:
        _wait(browser, lambda d: "extra-greeter" in _rows(d), "the new service never appeared on the page")
    finally:
        _stop(proc)
    _wait(browser, lambda d: "extra-greeter" not in _rows(d), "the stopped service stayed on the page")
    assert "task" in _rows(browser)


def test_try_it_calls_list_overdue_for_alice(system: str, browser: WebDriver, tmp_path: Path) -> None:
    browser.get(system + "/services/task")
    section = browser.find_element(By.ID, "ep-Task-ListOverdue")
    assert "Task.ListOverdue" in section.find_element(By.TAG_NAME, "h3").text
    field = section.find_element(By.ID, "f-Task-ListOverdue-user_id")  # labelled: the label's for= names it
    assert section.find_element(By.CSS_SELECTOR, "label[for='f-Task-ListOverdue-user_id']").text.startswith("user_id")
    field.send_keys("alice" + Keys.ENTER)  # the keyboard submits the form
    shown = _wait(browser, lambda d: d.find_element(By.ID, "result-Task-ListOverdue").text, "no response shown")
    rsp = msgspec.json.decode(str(shown))
    assert rsp["total"] == 3 and len(rsp["records"]) == 3
    assert {r["assignee"] for r in rsp["records"]} == {"alice"}
    browser.save_screenshot(str(tmp_path / "try-it.png"))
    # a bad value is the endpoint's error, shown in place
    section = browser.find_element(By.ID, "ep-Task-Create")
    section.find_element(By.CSS_SELECTOR, "button[type=submit]").click()  # required fields empty: the browser stops it
    assert browser.find_element(By.ID, "result-Task-Create").text == ""


def test_the_playground_streams_a_reply_with_tool_lines(system: str, browser: WebDriver, tmp_path: Path) -> None:
    browser.get(system + "/agents/task-mgr")
    browser.find_element(By.ID, "chat-message").send_keys("What tasks are overdue for Alice?")
    browser.find_element(By.CSS_SELECTOR, "#chat button[type=submit]").click()
    log = browser.find_element(By.ID, "chat-log")
    _wait(browser, lambda d: log.get_attribute("data-turns") == "1", "the chat turn never ended")
    tools = [e.text for e in log.find_elements(By.CSS_SELECTOR, ".tool")]
    results = [e.text for e in log.find_elements(By.CSS_SELECTOR, ".result")]
    assert tools == ['→ task_Task_ListOverdue({"user_id":"alice"})']
    assert len(results) == 1 and results[0].startswith('← {"records":[{"id":"t1"')
    reply = " ".join(e.text for e in log.find_elements(By.CSS_SELECTOR, ".reply-text"))
    assert "alice" in reply.lower() or "Alice" in reply
    browser.save_screenshot(str(tmp_path / "playground.png"))
    # the page's address now names the session: a reload reopens it with its earlier turns
    browser.refresh()
    earlier = _wait(browser, lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "#chat-log .earlier-turn")],
                    "the session's earlier turns were not shown")
    assert earlier[0] == "you: What tasks are overdue for Alice?" and tools[0] in earlier, earlier
    # the run is listed, and its page draws the timeline: model turns and the tool call as bars
    browser.get(system + "/agents/task-mgr?status=completed")
    browser.find_element(By.CSS_SELECTOR, "table.runs tbody a").click()
    bars = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "svg g.bar"), "no timeline")
    kinds = [b.get_attribute("class") for b in bars]
    assert "bar tool" in kinds and "bar model" in kinds
    labels = [b.find_element(By.TAG_NAME, "text").text for b in bars]
    assert "task_Task_ListOverdue" in labels
    # the model's turns as recorded: one asked for the tool, one answered, each with its own tokens
    turns = [label for label in labels if label.startswith("model turn")]
    assert len(turns) == 2 and all(re.fullmatch(r"model turn \d · \d+ in / \d+ out", t) for t in turns), labels
    assert len(browser.find_elements(By.CSS_SELECTOR, "table.turns tbody tr")) == 2
    browser.save_screenshot(str(tmp_path / "run.png"))


def test_a_paused_run_is_approved_from_the_page_and_completes(system: str, browser: WebDriver,
                                                             tmp_path: Path) -> None:
    browser.get(system + "/agents/task-mgr")
    browser.find_element(By.ID, "chat-message").send_keys("Delete task t7")
    browser.find_element(By.CSS_SELECTOR, "#chat button[type=submit]").click()
    link = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-log a.decide-link"),
                 "the paused run was never shown")
    waits = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#chat-log .waits")]
    assert waits == ['⏸ task_Task_Delete({"id":"t7"}) needs approval']
    link[0].click()  # type: ignore[index]
    _wait(browser, lambda d: d.find_element(By.ID, "run-status").text == "paused", "the run page did not open")
    browser.save_screenshot(str(tmp_path / "paused.png"))
    browser.find_element(By.CSS_SELECTOR, "button[name=action][value=approve]").click()
    _wait(browser, lambda d: d.find_element(By.ID, "run-status").text == "completed", "the run did not complete")
    calls = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "table.calls td code")]
    assert "task_Task_Delete" in calls
    browser.get(system + "/agents/task-mgr")
    assert browser.find_element(By.ID, "h-pending").find_element(By.XPATH, "..").text.endswith("No run waits.")


def test_each_call_of_a_paused_run_is_decided_on_its_own(system: str, browser: WebDriver, tmp_path: Path) -> None:
    browser.get(system + "/agents/task-mgr")
    browser.find_element(By.ID, "chat-message").send_keys("Delete tasks t5 and t6")
    browser.find_element(By.CSS_SELECTOR, "#chat button[type=submit]").click()
    link = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-log a.decide-link"),
                 "the paused run was never shown")
    link[0].click()  # type: ignore[index]
    _wait(browser, lambda d: d.find_element(By.ID, "run-status").text == "paused", "the run page did not open")
    calls = browser.find_elements(By.CSS_SELECTOR, ".pending .call")
    assert [c.find_element(By.CSS_SELECTOR, ".waits").text for c in calls] == [
        '⏸ task_Task_Delete({"id": "t5"}) needs approval', '⏸ task_Task_Delete({"id": "t6"}) needs approval']
    assert browser.find_elements(By.CSS_SELECTOR, "form.decide.all")  # and one form for both
    browser.save_screenshot(str(tmp_path / "paused-two.png"))
    calls[0].find_element(By.CSS_SELECTOR, "button[value=approve]").click()  # t5 only
    _wait(browser, lambda d: "decided: approved" in d.find_element(By.CSS_SELECTOR, ".pending .call").text,
          "the first decision was not shown")
    assert browser.find_element(By.ID, "run-status").text == "paused"  # t6 still waits
    second = browser.find_elements(By.CSS_SELECTOR, ".pending .call")[1]
    second.find_element(By.CSS_SELECTOR, "input[name=reason]").send_keys("keep it")
    second.find_element(By.CSS_SELECTOR, "button[value=deny]").click()
    _wait(browser, lambda d: d.find_element(By.ID, "run-status").text == "completed", "the run did not complete")
    reply = browser.find_element(By.CSS_SELECTOR, ".reply").text
    assert "Deleted: Prepare launch checklist" in reply and "not approved by a person: keep it" in reply, reply


def test_a_waiting_flow_run_is_resumed_from_its_form(system: str, browser: WebDriver, tmp_path: Path) -> None:
    browser.get(system + "/services/close-task")  # the flow's own Flow.Run endpoint, from its try-it form
    section = browser.find_element(By.ID, "ep-Flow-Run")
    section.find_element(By.ID, "f-Flow-Run-data").send_keys('{"task_id": "t2", "reason": "merged"}')
    section.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    shown = _wait(browser, lambda d: d.find_element(By.ID, "result-Flow-Run").text, "no response shown")
    run = msgspec.json.decode(str(shown))["run"]
    assert run["status"] == "waiting"
    browser.get(system + "/flows/close-task")
    browser.find_element(By.LINK_TEXT, run["id"]).click()
    _wait(browser, lambda d: d.find_element(By.ID, "run-status").text == "waiting", "the run page did not open")
    assert browser.find_element(By.CSS_SELECTOR, "label[for='in-approved']").text == "approved"
    browser.find_element(By.ID, "in-approved").click()
    browser.find_element(By.ID, "in-note").send_keys("thanks!")
    browser.save_screenshot(str(tmp_path / "flow-waiting.png"))
    browser.find_element(By.CSS_SELECTOR, "form.resume button[type=submit]").click()
    _wait(browser, lambda d: d.find_element(By.ID, "run-status").text == "completed", "the run did not complete")
    steps = {tr.find_element(By.TAG_NAME, "code").text: tr.find_element(By.CSS_SELECTOR, ".status").text
             for tr in browser.find_elements(By.CSS_SELECTOR, "table.steps tbody tr")}
    assert steps == {"lead": "completed", "approved": "completed", "closed": "completed", "notified": "completed"}
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg g.bar")) == 4


def test_a_refused_flow_run_fails_and_is_replayed(system: str, browser: WebDriver, tmp_path: Path) -> None:
    browser.get(system + "/services/close-task")
    section = browser.find_element(By.ID, "ep-Flow-Run")
    section.find_element(By.ID, "f-Flow-Run-data").send_keys('{"task_id": "t3", "reason": "stale"}')
    section.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    shown = _wait(browser, lambda d: d.find_element(By.ID, "result-Flow-Run").text, "no response shown")
    run_id = msgspec.json.decode(str(shown))["run"]["id"]
    browser.get(f"{system}/flows/close-task/runs/{run_id}")
    browser.find_element(By.ID, "in-note").send_keys("keep it open")  # approved left unchecked: a refusal
    browser.find_element(By.CSS_SELECTOR, "form.resume button[type=submit]").click()
    _wait(browser, lambda d: d.find_element(By.ID, "run-status").text == "failed", "the run did not fail")
    assert "the lead did not approve closing task t3: keep it open" in browser.find_element(By.TAG_NAME, "main").text
    browser.find_element(By.XPATH, "//button[text()='Replay this event']").click()
    _wait(browser, lambda d: d.find_element(By.ID, "run-status").text == "waiting", "the replay does not wait")
    assert browser.current_url == f"{system}/flows/close-task/runs/{run_id}-replay-1"
    browser.get(system + "/flows/close-task?status=failed")
    assert browser.find_elements(By.LINK_TEXT, run_id)
    browser.save_screenshot(str(tmp_path / "flow-replayed.png"))


XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'


def test_data_that_holds_markup_shows_as_text(system: str, browser: WebDriver, tmp_path: Path) -> None:
    browser.get(system + "/services/task")
    section = browser.find_element(By.ID, "ep-Task-Create")
    section.find_element(By.ID, "f-Task-Create-title").send_keys(XSS)
    section.find_element(By.ID, "f-Task-Create-due").send_keys("2020-01-01")
    section.find_element(By.ID, "f-Task-Create-assignee").send_keys("mallory")
    section.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    shown = _wait(browser, lambda d: d.find_element(By.ID, "result-Task-Create").text, "no response shown")
    assert msgspec.json.decode(str(shown))["record"]["title"] == XSS
    # the agent's run page shows its message, and the playground the reply: as text
    browser.get(system + "/agents/task-mgr")
    browser.find_element(By.ID, "chat-message").send_keys(f"What tasks are overdue for mallory? {XSS}")
    browser.find_element(By.CSS_SELECTOR, "#chat button[type=submit]").click()
    log = browser.find_element(By.ID, "chat-log")
    _wait(browser, lambda d: log.get_attribute("data-turns") == "1", "the chat turn never ended")
    assert XSS in log.text
    browser.get(system + "/agents/task-mgr")
    assert XSS in browser.find_element(By.CSS_SELECTOR, "table.runs").text
    browser.find_element(By.CSS_SELECTOR, "table.runs tbody a").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "run-status"), "the run page did not open")
    assert browser.find_element(By.CSS_SELECTOR, ".facts dd").text == f"What tasks are overdue for mallory? {XSS}"
    assert browser.find_elements(By.CSS_SELECTOR, "img[src=x]") == []
    assert browser.execute_script("return window.__xss === undefined") is True
    browser.save_screenshot(str(tmp_path / "xss.png"))


def test_with_a_token_pages_need_a_login(system: str, browser: WebDriver, env: dict[str, str],
                                         tmp_path: Path) -> None:
    proc, seen = _start(["dashboard", "--address", "127.0.0.1:0", "--token-env", "DASH_TOKEN"], env, "dashboard: ")
    try:
        url = seen[-1].split("dashboard: ")[1].split()[0]
        browser.delete_all_cookies()
        browser.get(url + "/services/task")
        assert browser.current_url.startswith(url + "/login")
        assert browser.find_elements(By.CSS_SELECTOR, "tr[data-service]") == []
        browser.find_element(By.ID, "token").send_keys("wrong")
        browser.find_element(By.CSS_SELECTOR, "form.login button").click()
        _wait(browser, lambda d: "not this server's token" in d.find_element(By.CSS_SELECTOR, ".error").text,
              "the wrong token was not refused")
        browser.find_element(By.ID, "token").send_keys("s3cret-token")
        browser.find_element(By.CSS_SELECTOR, "form.login button").click()
        _wait(browser, lambda d: d.current_url == url + "/services/task", "not back where it was going")
        assert browser.find_element(By.ID, "ep-Task-ListOverdue")
        port = url.rpartition(":")[2]
        cookie = browser.get_cookie(f"micro_token_{port}")
        assert cookie is not None and cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
        browser.save_screenshot(str(tmp_path / "logged-in.png"))
        # without the cookie: the API wants the bearer token, and the pages the login
        assert httpx.get(url + "/api/services").status_code == 401
        assert httpx.get(url + "/api/services", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        assert httpx.get(url + "/", headers={"Accept": "text/html"}).headers.get("location", "").startswith("/login")
        # logged in but without the page's CSRF token, an action is refused
        jar = {f"micro_token_{port}": cookie["value"], f"micro_csrf_{port}": "x" * 43}
        rsp = httpx.post(url + "/ui/call/task/Task.ListOverdue", data={"user_id": "alice"}, cookies=jar)
        assert "PERMISSION_DENIED" in rsp.text and "CSRF" in rsp.text and "records" not in rsp.text
        rsp = httpx.post(url + "/ui/call/task/Task.ListOverdue", data={"user_id": "alice", "csrf": "x" * 43},
                         cookies=jar)
        assert rsp.status_code == 200 and "&#34;records&#34;" in rsp.text  # the call went through
        # and a page of another site may not post at all
        rsp = httpx.post(url + "/ui/call/task/Task.ListOverdue", data={"user_id": "alice", "csrf": "x" * 43},
                         cookies=jar, headers={"Origin": "https://evil.example"})
        assert rsp.status_code == 403
    finally:
        _stop(proc)


def test_swagger_ui_shows_the_openapi_document(system: str, browser: WebDriver, tmp_path: Path) -> None:
    browser.get(system + "/docs")
    paths = _wait(browser, lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")],
                  "Swagger UI showed no operations")
    assert "/api/task/Task.ListOverdue" in paths  # type: ignore[operator]
    browser.save_screenshot(str(tmp_path / "swagger.png"))
