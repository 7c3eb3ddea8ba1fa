"""What the service keeps between requests (gate verdicts, review fingerprints, trends) never
outlives what it was made from: a new review, a new run or a new database."""

from __future__ import annotations

import shutil
from pathlib import Path

from .conftest import Served, flag, iso, serve, summary, write_run

WAIVER = {"status": "legitimate", "reviewer": "alice", "reason": "the product's logo"}


def close(served: Served) -> None:
    served.client.close()
    served.app.state.service.engine.dispose()


def flag_id(served: Served) -> int:
    return served.client.get(f"/api/runs/{served.latest_run()['id']}/flags").json()[0]["id"]


def gate(served: Served) -> dict[str, object]:
    return served.client.get(f"/api/jobs/{served.job_id()}/gate").json()


def test_every_new_review_gives_a_new_verdict_between_cached_reads(served: Served) -> None:
    target = flag_id(served)
    assert gate(served)["verdict"] == "flagged"
    for status, verdict in (("legitimate", "waived"), ("needs_look", "flagged"), ("legitimate", "waived"), ("confirmed_shortcut", "flagged")):
        body = {**WAIVER, "status": status}
        assert served.client.post(f"/api/flags/{target}/reviews", json=body, headers=served.auth).status_code == 201
        for _ in range(2):  # the second read comes from the cache
            assert gate(served)["verdict"] == verdict


def test_a_database_made_again_at_the_same_path_gets_no_verdict_of_the_old_one(reports: Path) -> None:
    first = serve(reports)
    assert first.client.post(f"/api/flags/{flag_id(first)}/reviews", json=WAIVER, headers=first.auth).status_code == 201
    assert gate(first)["verdict"] == "waived"
    close(first)
    for path in reports.glob("spray.db*"):
        path.unlink()
    again = serve(reports)  # same folder, same run and flag ids, same review id and count
    try:
        body = {**WAIVER, "status": "needs_look"}
        assert again.client.post(f"/api/flags/{flag_id(again)}/reviews", json=body, headers=again.auth).status_code == 201
        assert (gate(again)["verdict"], gate(again)["flags"][0]["status"]) == ("flagged", "needs_look")  # type: ignore[index]
    finally:
        close(again)


def test_the_run_page_lists_the_newest_reviews_and_links_the_whole_history(served: Served) -> None:
    target = flag_id(served)
    for number in range(23):
        body = {**WAIVER, "status": "needs_look", "comment": f"look number {number}"}
        assert served.client.post(f"/api/flags/{target}/reviews", json=body, headers=served.auth).status_code == 201
    page = served.client.get(f"/runs/{served.latest_run()['id']}").text
    assert "look number 22" in page and "look number 3" in page and "look number 2<" not in page
    assert "the newest 20 of 23 reviews" in page and f'href="/api/flags/{target}/reviews"' in page
    assert len(served.client.get(f"/api/flags/{target}/reviews").json()) == 23  # the history itself is whole


def test_the_trend_follows_a_new_run(served: Served) -> None:
    job = served.job_id()
    before = served.client.get(f"/jobs/{job}/trend").text
    assert "demo/runs/20260102T020000Z" not in before
    write_run(served.reports, "demo", "20260102T020000Z", summary("demo", iso("20260102T020000Z"), [flag(range(0, 100)), flag(range(500, 560), class_index=0, class_name="circle", cluster_id=3)]))
    served.rebuild()
    after = served.client.get(f"/jobs/{job}/trend").text
    assert "demo/runs/20260102T020000Z" in after and "F2" in after and "F2" not in before


def test_a_copied_reports_folder_is_a_new_database(served: Served, tmp_path: Path) -> None:
    """The same run ids in another database (a copy of the folder) start from their own reviews."""
    copy = tmp_path / "copy"
    shutil.copytree(served.reports, copy)
    assert served.client.post(f"/api/flags/{flag_id(served)}/reviews", json=WAIVER, headers=served.auth).status_code == 201
    assert gate(served)["verdict"] == "waived"
    other = serve(copy)
    try:
        assert gate(other)["verdict"] == "flagged"
    finally:
        close(other)


def test_a_single_flight_memo_makes_a_value_once_while_others_wait() -> None:
    import threading
    import time

    from spray.service.memo import Memo

    memo: Memo[int] = Memo(2, single_flight=True)
    calls: list[str] = []
    started = threading.Barrier(4)

    def make(key: str) -> int:
        calls.append(key)
        time.sleep(0.1)  # long enough for every other thread to ask meanwhile
        return len(calls)

    def ask(key: str, out: list[int]) -> None:
        started.wait()
        out.append(memo.get_or_make(key, lambda: make(key)))

    results: list[int] = []
    threads = [threading.Thread(target=ask, args=("a", results)) for _ in range(3)]
    other: list[int] = []
    threads.append(threading.Thread(target=ask, args=("b", other)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(calls) == ["a", "b"]  # one make per key, the other key not held up behind it
    assert len(set(results)) == 1 and len(results) == 3
    memo.put("c", 9)  # the least recently used of three goes
    assert len(memo) == 2 and memo.get("c") == 9
