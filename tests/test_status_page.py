"""The status page (``GET /``) as a person sees it: headless Chromium loads it from a
running cacheport with an UP and a DOWN upstream and a memcached cluster whose node
hostname is ``<script>...``, and reads the text on the screen."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy.admin import human_bytes, page
from tests.cluster_helpers import ConfigEndpoint, free_range
from tests.healthkit import DOWN_WITHIN, FAST, UP_WITHIN, admin_address, status, wait_health
from tests.support import ProxyThread, ServerProcess, free_port, make_config, wait_until

pytestmark = pytest.mark.timeout(90)

HOSTILE = "<script>alert('node')</script>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def render(doc: dict[str, Any]) -> str:
    async def pause() -> None:
        pass

    return b"".join(asyncio.run(page.render_parts(doc, 5, pause))).decode()


def test_every_value_from_the_network_is_escaped() -> None:
    doc = {"version": "0.1.0", "ready": False, "ready_reason": "<b>why</b>",
           "listeners": [{"name": "l<1>", "listen": "127.0.0.1:1", "refused": {"<r>": 1},
                          "upstreams": [{"address": "x\"><img src=x onerror=alert(1)>",
                                         "health": "down\" onmouseover=\"x", "last_check": {
                                             "ok": False, "reason": "<i>refused</i>"}}]}],
           "clusters": [{"name": "c", "nodes": [{"id": HOSTILE, "address": "a&b",
                                                 "slots": [[0, 1]], "port": 7000}],
                         "last_error": "</table><script>x()</script>"}]}
    text = render(doc)
    assert "<script" not in text and "<img" not in text and "<b>why" not in text
    assert "&lt;script&gt;alert(&#x27;node&#x27;)&lt;/script&gt;" in text
    assert "&lt;i&gt;refused&lt;/i&gt;" in text and "a&amp;b" in text
    assert "DOWN&quot; ONMOUSEOVER=&quot;X" in text and "onmouseover=\"" not in text


def test_the_page_needs_nothing_from_the_internet_and_refreshes_itself() -> None:
    text = render({"listeners": []})
    assert '<meta http-equiv="refresh" content="5">' in text
    assert 'name="viewport"' in text
    for outside in ("http://", "https://", "//", "<link", "<script", "@import"):
        assert outside not in text.replace("http-equiv", ""), outside


@pytest.fixture
def served(redis_server: ServerProcess, memcached: ServerProcess,
           tmp_path: Path) -> Iterator[ProxyThread]:
    endpoint = ConfigEndpoint(memcached.port, [(HOSTILE, "127.0.0.1", memcached.port)])
    base = free_range(5)
    cluster = {"name": "mc", "engine": "memcached", "seed": f"127.0.0.1:{endpoint.port}",
               "announce": "127.0.0.1", "listen": "127.0.0.1", "ports": f"{base}-{base + 4}",
               "refresh": "300ms", "health": False}
    dead = free_port()
    listeners = [
        {"name": "cache", "listen": "127.0.0.1:0", "upstream": redis_server.address,
         "protocol": "redis", "health": FAST},
        {"name": "gone", "listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{dead}",
         "protocol": "redis", "health": FAST},
    ]
    config = make_config(listeners, clusters=[cluster], admin={"listen": "127.0.0.1:0"},
                         state_dir=str(tmp_path / "state"))
    proxy = ProxyThread(config).start()
    try:
        wait_health(proxy, "cache", redis_server.address, "up", UP_WITHIN)
        wait_health(proxy, "gone", f"127.0.0.1:{dead}", "down", DOWN_WITHIN)
        wait_until(lambda: any(n["port"] and n["listening"]
                               for c in status(proxy).get("clusters", [])
                               for n in c["nodes"]), 10, message="the cluster node's port")
        yield proxy
    finally:
        proxy.stop()
        endpoint.close()


def chrome(width: int, height: int) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-default-apps", "--disable-extensions",
                 # loopback only: every other name fails to resolve
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER or ""))
    driver.set_page_load_timeout(20)
    return driver


@pytest.fixture
def browser() -> None:
    """Skips (fails under CI=true) before anything starts when there is no browser."""
    missing = "" if CHROMIUM and CHROMEDRIVER else "chromium and chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing = missing or "selenium (the dev extra)"
    if missing:
        message = f"needs {missing}; scripts/bootstrap.sh installs them"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def test_a_person_sees_listeners_the_down_upstream_and_its_reason_and_the_node_ports(
        browser: None, served: ProxyThread, redis_server: ServerProcess,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never download a driver
    doc = status(served)
    gone = next(lst for lst in doc["listeners"] if lst["name"] == "gone")
    reason = gone["upstreams"][0]["last_check"]["reason"]
    [cluster] = doc["clusters"]
    [node] = cluster["nodes"]
    address = admin_address(served)
    client = redis.Redis(port=served.port("cache"), socket_timeout=5,
                         single_connection_client=True)
    client.set("page", "x" * 3000)
    driver = chrome(1280, 900)
    try:
        driver.get(f"http://127.0.0.1:{address.port}/?refresh=0")
        assert driver.title.startswith("cacheport")
        rows = {row.get_attribute("data-listener"): row.text
                for row in driver.find_elements(By.CSS_SELECTOR, "tr.listener")}
        assert {"cache", "gone"} <= set(rows)  # and the cluster node's own listener
        assert f"127.0.0.1:{served.port('gone')}" in rows["gone"]
        upstreams = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "tr.upstream")]
        [down] = [r for r in upstreams if "DOWN" in r]
        assert f"127.0.0.1:{gone['upstreams'][0]['address'].rsplit(':', 1)[1]}" in down
        assert f"failed: {reason}" in down
        [up] = [r for r in upstreams if "UP" in r.split() and redis_server.address in r]
        sent = next(lst for lst in status(served)["listeners"] if lst["name"] == "cache")
        sent_bytes = sent["upstreams"][0]["bytes_upstream"]
        assert sent_bytes > 3000 and human_bytes(sent_bytes) in up  # as a person reads them
        assert driver.find_element(By.CSS_SELECTOR, "td.down").value_of_css_property(
            "background-color") != driver.find_element(By.CSS_SELECTOR, "td.up") \
            .value_of_css_property("background-color")
        table = driver.find_element(By.CSS_SELECTOR, "table.cluster").text
        node_row = next(line for line in table.splitlines() if HOSTILE in line)
        assert str(node["port"]) in node_row.split()  # the node's hostname, as text, and port
        assert driver.find_elements(By.TAG_NAME, "script") == []
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert.accept()
        assert "ready" in driver.find_element(By.ID, "ready").text
        shot = os.environ.get("CACHEPORT_SCREENSHOT")
        if shot:
            driver.find_element(By.TAG_NAME, "body").screenshot(shot)  # the content only
    finally:
        driver.quit()
        client.close()
    phone = chrome(390, 844)
    try:
        phone.get(f"http://127.0.0.1:{address.port}/?refresh=0")
        # readable on a phone: the page is as wide as the screen; wide tables scroll inside
        width = phone.execute_script("return document.documentElement.scrollWidth")
        inner = phone.execute_script("return window.innerWidth")
        assert width <= inner
    finally:
        phone.quit()
