"""report.html: written while the run goes and final at the end, self-contained (no script, no
address outside the page), with every section, the plots inline and example rows beside their
input; the plan's projection appears next to what happened when the folder has a plan."""

import shutil
import subprocess
import threading
import time
from html.parser import HTMLParser

import pytest

from nemocc_dask import LLMConfig, MockLLMServer, run_to_parquet
from nemocc_dask.run.report_html import SECTIONS


class Page(HTMLParser):
    """The section ids, the external addresses and the tags of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.external, self.tags = [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            if value and not value.startswith("#"):
                self.external.append(value)


@pytest.mark.slow
def test_report_html_live_then_final(tmp_path, docs_parquet, nemocc_config):
    nemocc_config({"report-refresh-seconds": 0.5})
    out = tmp_path / "out"
    live_pages = []

    def watch():
        deadline = time.time() + 60
        while time.time() < deadline and not (out / "report.json").exists():
            page = out / "report.html"
            if page.exists():
                text = page.read_text()
                if "live, refreshed" in text:
                    live_pages.append(text)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    with MockLLMServer(latency=0.3, noise_sigma=0.3, rate_500=0.05) as server:
        watcher.start()
        report = run_to_parquet(docs_parquet, out, "diverse_qa",
                                LLMConfig(base_url=server.base_url, model="mock",
                                          max_in_flight=4),
                                rows_per_partition=20, show_progress=False)
        watcher.join()
    assert live_pages, "no live report.html while the run went"
    assert "http-equiv='refresh'" in live_pages[0]
    text = (out / "report.html").read_text()
    page = Page(text)
    assert page.sections == list(SECTIONS)
    assert page.external == [] and "script" not in page.tags
    assert "final" in text and "http-equiv" not in text
    assert text.count("<svg") >= 4  # throughput, rows, two token histograms
    first = __import__("pandas").read_parquet(sorted((out / "parts").glob("*.parquet"))[0])
    assert first["diverse_qa"].iloc[0][:40] in text.replace("&#x27;", "'").replace("&quot;", '"')
    assert str(report["rows_written"]) in text
    assert "No plan.json" in text


@pytest.mark.slow
def test_report_html_sets_the_plan_beside_the_run(tmp_path, docs_parquet):
    from nemocc_dask.run.plan import plan

    with MockLLMServer(latency=0.02) as server:
        llm = LLMConfig(base_url=server.base_url, model="mock")
        planned = plan(docs_parquet, tmp_path / "out", "distill", llm, rows_per_partition=20,
                       probe_requests=10)
        run_to_parquet(docs_parquet, tmp_path / "out", "distill", llm, rows_per_partition=20,
                       show_progress=False)
    text = (tmp_path / "out" / "report.html").read_text()
    section = text[text.index("<section id='plan'>"):]
    assert "planned" in section and f"{planned['tasks']['distill']['requests']}" in section


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless chromium installed")
def test_report_html_loads_offline_in_a_headless_browser(tmp_path, docs_parquet):
    with MockLLMServer(latency=0.02) as server:
        run_to_parquet(docs_parquet, tmp_path / "out", "distill",
                       LLMConfig(base_url=server.base_url, model="mock"), rows_per_partition=20,
                       show_progress=False)
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                          "--dump-dom", (tmp_path / "out" / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert Page(dom).sections == list(SECTIONS) and dom.count("<svg") >= 4
