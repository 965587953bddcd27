"""A distributed group as the server reports it: /api/ps's `distributed` object on the served
model, and /metrics' group gauges (a FakeEngine that says it serves across 3 ranks)."""

from __future__ import annotations

import dataclasses

from fastapi.testclient import TestClient

from engine.types import EngineStats, GroupStatus, RankStatus
from tests.promtext import sample
from tests.server.fake_engine import FAKE_MODEL, FakeEngine, make_app

GROUP = GroupStatus(
    "tensor",
    FAKE_MODEL,
    "tensor parallel over 3 ranks",
    [RankStatus(r, pid=100 + r, weight_bytes=1000 + r, active_bytes=2000, peak_bytes=3000,
                kv_tokens=4000 + r) for r in range(3)],
)  # fmt: skip


class GroupEngine(FakeEngine):
    def group_status(self) -> GroupStatus:
        return GROUP

    def stats(self) -> EngineStats:
        return dataclasses.replace(super().stats(), group=GROUP)


def test_ps_and_metrics_report_the_group() -> None:
    with TestClient(make_app(GroupEngine())) as client:
        assert client.get("/api/ps").json()["models"] == []
        client.post("/api/chat", json={"model": FAKE_MODEL, "messages": []})  # loads it
        (entry,) = client.get("/api/ps").json()["models"]
        group = entry["distributed"]
        assert group["mode"] == "tensor" and group["ranks"] == 3 and group["failed"] == ""
        assert [r["weight_bytes"] for r in group["per_rank"]] == [1000, 1001, 1002]
        assert group["per_rank"][2] == {"rank": 2, "pid": 102, "weight_bytes": 1002,
                                        "active_bytes": 2000, "peak_bytes": 3000,
                                        "kv_tokens": 4002}  # fmt: skip
        text = client.get("/metrics").text
    assert sample(text, "mlxd_group_ranks") == 3
    assert sample(text, "mlxd_group_up", mode="tensor") == 1
    assert sample(text, "mlxd_group_rank_weight_bytes", rank="1") == 1001
    assert sample(text, "mlxd_group_rank_kv_tokens", rank="2") == 4002


def test_one_process_reports_no_group() -> None:
    with TestClient(make_app(FakeEngine())) as client:
        client.post("/api/chat", json={"model": FAKE_MODEL, "messages": []})
        (entry,) = client.get("/api/ps").json()["models"]
        assert "distributed" not in entry
        assert "mlxd_group" not in client.get("/metrics").text
