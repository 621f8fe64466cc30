"""Reports: the numbers in report.json are the ledger's, the HTML is self-contained and escaped, and a run
that stopped early (or never wrote metrics.json) still gets a report."""

from __future__ import annotations

import argparse
import json
import math
import sqlite3

import pytest
from support import RUN_ID, write_run

from fedllm.cli.report import register
from fedllm.ledger import Ledger, read_entries
from fedllm.metrics import read as read_metrics
from fedllm.report.facts import SCHEMA_VERSION
from fedllm.report.write import write_reports


@pytest.fixture(scope="module")
def refused_run(tmp_path_factory):
    """Three rounds; gamma refuses from round 2 on, so its epsilon must be carried forward."""
    run = write_run(tmp_path_factory.mktemp("report") / "run", refuse_from={"gamma": 2})
    return run, write_reports(run)


def test_files_exist(refused_run):
    run, paths = refused_run
    assert set(paths) == {"json", "md", "html"}
    assert paths == {"json": run / "report.json", "md": run / "report.md", "html": run / "report.html"}
    assert all(p.is_file() and p.stat().st_size > 500 for p in paths.values())
    assert not list(run.glob("*.tmp"))


def test_json_numbers_equal_ledger_numbers(refused_run):
    run, paths = refused_run
    report = json.loads(paths["json"].read_text())
    assert report["schema"] == "fedllm-report" and report["version"] == SCHEMA_VERSION
    rows = read_entries(run / "ledger.sqlite")
    metrics = read_metrics(run / "metrics.json")
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert [r["accuracy"] for r in report["rounds"]] == [r.accuracy for r in metrics.rounds]
    assert [r["loss"] for r in report["rounds"]] == [r.loss for r in metrics.rounds]
    assert report["initial"] == {"accuracy": 0.25, "loss": 1.4}
    assert [c["id"] for c in report["clients"]] == ["alpha", "beta", "gamma"]
    for c in report["clients"]:
        mine = [e for e in rows if e.client_id == c["id"]]
        trained = [e for e in mine if e.status == "trained"]
        assert c["rounds_trained"] == len(trained)
        assert c["final_epsilon"] == trained[-1].epsilon
        assert c["budget_epsilon"] == mine[-1].budget_epsilon == 8.0
        assert c["delta"] == mine[-1].delta == 1e-5
        assert c["status_per_round"] == [e.status for e in mine]
        expected, current = [], 0.0
        for e in mine:
            current = e.epsilon if e.status == "trained" else current
            expected.append(current)
        assert c["epsilon_per_round"] == expected
        assert c["key_fingerprint"].startswith("SHA256:")
    gamma = report["clients"][2]
    assert gamma["rounds_trained"] == 1
    assert gamma["epsilon_per_round"][0] == gamma["epsilon_per_round"][1] == gamma["epsilon_per_round"][2] > 0
    assert gamma["status_per_round"] == ["trained", "refused", "refused"]
    run_ = report["run"]
    assert run_["run_id"] == RUN_ID and run_["scenario"] == "audit-test"
    assert run_["rounds_planned"] == 3 and run_["rounds_completed"] == 3 and run_["stopped_early"] is None
    assert run_["num_clients"] == 3 and run_["dp"] is True and run_["accountant"] == "prv"
    assert run_["model"] == {"name": "tiny-bert", "mode": "lora"}
    assert run_["data"]["source"] == "synthetic" and run_["data"]["partition"] == "iid"
    assert run_["budgets"] == {"alpha": 8.0, "beta": 8.0, "gamma": 8.0}
    assert run_["secure_aggregation"] is True and run_["tls"] is False  # SecAgg+ is on by default
    assert report["audit"]["ok"] is True and report["audit"]["findings"] == []
    assert report["audit"]["tolerance"] == 0.05
    audited = {c["client"]: c for c in report["audit"]["clients"]}
    assert audited["alpha"]["recomputed_epsilon"] == pytest.approx(report["clients"][0]["final_epsilon"], rel=1e-6)


def test_html_is_self_contained(refused_run):
    _, paths = refused_run
    page = paths["html"].read_text()
    assert "http://" not in page and "https://" not in page
    assert "http" not in page.lower()  # no URL of any kind: not even an SVG namespace
    for external in ("<link", "@import", "url(", " src=", "@font-face"):
        assert external not in page
    assert page.count("<svg") == 2
    assert page.count('class="series"') == 3  # one epsilon series per client
    assert page.count('class="budget"') == 3 and 'stroke-dasharray="6 4"' in page
    assert 'id="clients-table"' in page and page.count("<tr>") >= 3
    assert "secure aggregation</th><td" in page and page.count("not used") == 1  # TLS; SecAgg+ is on
    assert "Audit: clean" in page and "document.body.dataset.rendered" in page


def test_markdown_has_the_same_facts(refused_run):
    _, paths = refused_run
    md = paths["md"].read_text()
    report = json.loads(paths["json"].read_text())
    for c in report["clients"]:
        assert f"| {c['id']} | 8.0000 | 1e-05 | {c['final_epsilon']:.4f} | {c['rounds_trained']} |" in md
    assert "| secure aggregation | on |" in md and "| TLS | not used |" in md
    assert "| 3 | 0.6000 | 0.9000 | 2 |" in md  # round 3: accuracy, loss, two updates (gamma refused)
    assert "**Audit:** clean" in md


def test_user_strings_are_escaped(tmp_path):
    evil = '<img src=x onerror="alert(1)">'
    run = write_run(tmp_path / "run", clients=(evil, "a|b&c"), rounds=1)
    paths = write_reports(run)
    page = paths["html"].read_text()
    assert evil not in page and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert "a|b&amp;c" in page and "a|b&c" not in page
    assert "a\\|b&c" in paths["md"].read_text()  # a pipe would split the markdown cell
    assert json.loads(paths["json"].read_text())["clients"][0]["id"] == evil


def test_run_that_stopped_early_still_reports(tmp_path):
    reason = "fewer than min_clients (2) clients have budget left"
    run = write_run(tmp_path / "run", rounds=2, rounds_planned=5, stopped_early=reason)
    paths = write_reports(run)
    report = json.loads(paths["json"].read_text())
    assert report["run"]["rounds_planned"] == 5 and report["run"]["rounds_completed"] == 2
    assert report["run"]["stopped_early"] == reason
    assert len(report["rounds"]) == 2 and all(len(c["epsilon_per_round"]) == 2 for c in report["clients"])
    assert "The run stopped early" in paths["html"].read_text() and reason in paths["md"].read_text()


def test_run_without_metrics_reports_from_the_ledger(tmp_path):
    """A crash before metrics.json was written: the ledger alone still gives epsilons and statuses."""
    run = write_run(tmp_path / "run", rounds=2)
    (run / "metrics.json").unlink()
    report = json.loads(write_reports(run)["json"].read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert all(r["accuracy"] is None for r in report["rounds"])
    rows = read_entries(run / "ledger.sqlite")
    assert report["clients"][0]["final_epsilon"] == rows[-1].epsilon
    assert report["audit"]["ok"] is True


def test_non_private_run(tmp_path):
    run = write_run(tmp_path / "run", dp=False, rounds=2)
    paths = write_reports(run)
    report = json.loads(paths["json"].read_text())  # parses: no Infinity in it
    assert report["run"]["dp"] is False and report["run"]["accountant"] is None
    for c in report["clients"]:
        assert c["final_epsilon"] is None and c["budget_epsilon"] is None
        assert c["epsilon_per_round"] == [None, None] and c["rounds_trained"] == 2
    page = paths["html"].read_text()
    assert "non-private run: epsilon is infinite" in page and page.count('class="series"') == 0
    assert "∞ (non-private)" in paths["md"].read_text()


def test_secure_aggregation_and_tls_flags(tmp_path):
    run = write_run(tmp_path / "run", rounds=1, config_extra={"secure_aggregation": {"enabled": False}, "tls": True})
    paths = write_reports(run)
    report = json.loads(paths["json"].read_text())
    assert report["run"]["secure_aggregation"] is False and report["run"]["tls"] is True
    assert "| secure aggregation | not used |" in paths["md"].read_text()
    assert report["audit"]["ok"] is True


def test_budgets_are_the_configs_effective_client_settings(tmp_path):
    """A client's own [[clients]] epsilon/delta wins over [privacy], as config decides; a key this version does not
    know (``tls`` here) does not stop the report."""
    clients = [{"id": "alpha", "epsilon": 3.0, "delta": 1e-6}, {"id": "beta"}, {"id": "gamma"}]
    run = write_run(tmp_path / "run", rounds=1, config_extra={"clients": clients, "tls": True})
    settings = json.loads(write_reports(run)["json"].read_text())["run"]
    assert settings["budgets"] == {"alpha": 3.0, "beta": 8.0, "gamma": 8.0}
    assert settings["deltas"] == {"alpha": 1e-6, "beta": 1e-5, "gamma": 1e-5}
    assert settings["epsilon_default"] == 8.0 and settings["delta_default"] == 1e-5 and settings["tls"] is True


def test_tampered_run_report_carries_the_findings(tmp_path):
    run = write_run(tmp_path / "run", rounds=2)
    conn = sqlite3.connect(run / "ledger.sqlite", isolation_level=None)
    conn.execute("DROP TRIGGER entries_no_update")
    conn.execute("UPDATE entries SET epsilon = 0.01 WHERE seq = 4")
    conn.close()
    paths = write_reports(run)
    report = json.loads(paths["json"].read_text())
    assert report["audit"]["ok"] is False
    assert any(f.startswith("epsilon edited") for f in report["audit"]["findings"])
    # the edited coordinator row says 0.01; the report never shows less than the client's own ledger spent...
    own = read_entries(run / "clients" / report["clients"][0]["id"] / "ledger.sqlite")[-1].epsilon
    assert report["clients"][0]["final_epsilon"] == own > 0.5
    page = paths["html"].read_text()
    assert 'class="verdict bad"' in page and "epsilon edited" in page  # ...next to the audit saying it is wrong


def test_cli(tmp_path, capsys):
    run = write_run(tmp_path / "run", rounds=1)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(run)])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(run / "report.json"), str(run / "report.md"), str(run / "report.html")]
    assert math.isfinite(json.loads((run / "report.json").read_text())["clients"][0]["final_epsilon"])


# ---------------------------------------------------------------------------------------------- accuracy vs epsilon


@pytest.fixture(scope="module")
def folder_of_runs(tmp_path_factory):
    """Three runs of one scenario (3 rounds DP with gamma refusing from round 2, 2 rounds DP, 1 round non-private)
    and one of another scenario, reported together with ``fedllm report FOLDER``."""
    from fedllm.cli import main
    from fedllm.metrics import write as write_metrics

    folder = tmp_path_factory.mktemp("curve")
    write_run(folder / "dp-3", rounds=3, refuse_from={"gamma": 2})
    write_run(folder / "dp-2", rounds=2, epsilon_scale=0.5)
    write_run(folder / "nodp", rounds=1, dp=False)
    other = write_run(folder / "other", rounds=1)
    m = read_metrics(other / "metrics.json")
    m.scenario = "another-scenario"
    write_metrics(m, other / "metrics.json")
    (folder / "notes").mkdir()  # not a run: ignored
    assert main(["report", str(folder)]) == 0
    return folder


def _expected_point(run) -> dict:
    """What the curve must say of a run, straight from its metrics.json."""
    m = read_metrics(run / "metrics.json")
    finals = [c.epsilon for c in m.final_clients().values() if c.epsilon is not None]
    return {
        "run": run.name,
        "scenario": m.scenario,
        "dp": m.dp,
        "epsilon_max": max(finals) if m.dp else None,
        "epsilon_min": min(finals) if m.dp else None,
        "accuracy": m.rounds[-1].accuracy,
        "rounds": len(m.rounds),
    }


def test_run_report_curve_numbers_equal_the_runs_metrics(folder_of_runs):
    report = json.loads((folder_of_runs / "dp-3" / "report.json").read_text())
    curve = report["curve"]
    assert curve["this_run"] == "dp-3" and curve["dir"] == str(folder_of_runs.resolve())
    names = ("dp-2", "dp-3", "nodp")  # sorted by largest client epsilon, the non-private run last
    assert curve["runs"] == [_expected_point(folder_of_runs / n) for n in names]
    dp3, dp2, nodp = (curve["runs"][names.index(n)] for n in ("dp-3", "dp-2", "nodp"))
    assert dp3["accuracy"] == pytest.approx(0.6) and dp2["accuracy"] == pytest.approx(0.5) and nodp["dp"] is False
    assert dp3["epsilon_max"] > dp3["epsilon_min"] > 0  # gamma stopped after round 1: max is the spender's
    assert dp2["epsilon_max"] < dp3["epsilon_max"] and nodp["epsilon_max"] is None
    # The curve's epsilon is the run's own: the largest final epsilon of its report (from the ledger).
    assert dp3["epsilon_max"] == max(c["final_epsilon"] for c in report["clients"])
    assert dp3["epsilon_min"] == min(c["final_epsilon"] for c in report["clients"])
    # Every run of the scenario shows the same curve, marked as its own.
    for n in names:
        other = json.loads((folder_of_runs / n / "report.json").read_text())["curve"]
        assert other["runs"] == curve["runs"] and other["this_run"] == n
    # A run alone in its scenario (even with other runs beside it) shows none.
    assert json.loads((folder_of_runs / "other" / "report.json").read_text())["curve"] is None


def test_run_report_curve_html_and_markdown(folder_of_runs):
    page = (folder_of_runs / "dp-3" / "report.html").read_text()
    assert "http" not in page.lower() and 'id="curve-chart"' in page and 'id="curve-table"' in page
    assert page.count("<svg") == 3 and 'data-expect="epsilon-chart accuracy-chart clients-table curve-chart"' in page
    chart = page[page.index('<div id="curve-chart">') : page.index('id="curve-table"')]
    assert chart.count('<g class="curve"') == 1 and chart.count("<circle") == 2  # the two private runs
    assert chart.count('class="budget"') == 1 and ">no DP</text>" in chart  # the non-private run, dashed
    assert page.count('class="series"') == 3  # the epsilon chart is unchanged
    assert '<tr class="this"><td class="l">dp-3 (this run)</td>' in page
    md = (folder_of_runs / "dp-3" / "report.md").read_text()
    for p in json.loads((folder_of_runs / "dp-3" / "report.json").read_text())["curve"]["runs"]:
        name = p["run"] + (" (this run)" if p["run"] == "dp-3" else "")
        eps = "inf (no DP)" if p["epsilon_max"] is None else f"{p['epsilon_max']:.2f}"
        assert f"| {name} | {eps} |" in md and f"| {p['rounds']} | {100 * p['accuracy']:.1f} % |" in md


def test_folder_report_compares_every_run(folder_of_runs, capsys):
    comparison = json.loads((folder_of_runs / "report.json").read_text())
    assert comparison["schema"] == "fedllm-comparison" and comparison["version"] == 1
    names = ("other", "dp-2", "dp-3", "nodp")  # by scenario, then epsilon
    assert comparison["runs"] == [_expected_point(folder_of_runs / n) for n in names]
    assert comparison["skipped"] == []
    page = (folder_of_runs / "report.html").read_text()
    assert "http" not in page.lower() and page.count('<g class="curve"') == 2  # one line per scenario
    assert page.count("<circle") == 3 and '<a href="./dp-3/report.html">' in page
    md = (folder_of_runs / "report.md").read_text()
    assert "| scenario | run |" in md and "| another-scenario | other |" in md


def test_folder_report_prints_every_file_and_compare_agrees(folder_of_runs, capsys, tmp_path):
    from fedllm.cli import main

    assert main(["report", str(folder_of_runs)]) == 0
    printed = capsys.readouterr().out.split()
    runs = ["dp-2", "dp-3", "nodp", "other"]
    expected = [str(folder_of_runs / n / f"report.{k}") for n in runs for k in ("json", "md", "html")]
    assert printed == expected + [str(folder_of_runs / f"report.{k}") for k in ("json", "md", "html")]
    js = tmp_path / "points.json"
    assert main(["compare", *(str(folder_of_runs / n) for n in runs[:3]), "--json", str(js)]) == 0
    points = json.loads(js.read_text())
    curve = json.loads((folder_of_runs / "dp-3" / "report.json").read_text())["curve"]["runs"]
    assert [{**p, "run": p["run"].rsplit("/", 1)[-1]} for p in points] == curve  # one logic, one answer


def test_unreadable_run_is_listed_not_fatal(tmp_path):
    write_run(tmp_path / "a", rounds=1)
    write_run(tmp_path / "b", rounds=2)
    broken = write_run(tmp_path / "c", rounds=1)
    (broken / "metrics.json").write_text("{not json")
    from fedllm.report.curve import build_comparison, sibling_curve

    comparison = build_comparison(tmp_path)
    assert [p["run"] for p in comparison["runs"]] == ["a", "b"]
    assert [s["run"] for s in comparison["skipped"]] == ["c"]
    assert [p["run"] for p in sibling_curve(tmp_path / "a")["runs"]] == ["a", "b"]


def test_folder_without_runs_is_refused(tmp_path, capsys):
    from fedllm.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "not a fedllm run directory" in capsys.readouterr().err
    assert not list((tmp_path / "empty").iterdir())


# ---------------------------------------------------------------------------------------------- many registered clients


@pytest.fixture(scope="module")
def crowd_run(tmp_path_factory):
    """2,000 clients registered (config.toml), 3 of them sampled: the others (client-0 ... client-1996) have
    no ledger row and no folder."""
    run = write_run(tmp_path_factory.mktemp("crowd") / "run", rounds=2, config_extra={"num_clients": 2000})
    return run, write_reports(run)


def test_report_details_only_the_clients_that_took_part(crowd_run):
    run, paths = crowd_run
    report = json.loads(paths["json"].read_text())
    never = [f"client-{i}" for i in range(1997)]
    assert report["run"]["num_clients"] == 2000 and len(report["run"]["budgets"]) == 2000
    assert [c["id"] for c in report["clients"]] == ["alpha", "beta", "gamma"]
    rows = read_entries(run / "ledger.sqlite")
    for c in report["clients"]:  # every field, as for a run of three
        trained = [e for e in rows if e.client_id == c["id"] and e.status == "trained"]
        assert c["rounds_trained"] == 2 and c["final_epsilon"] == trained[-1].epsilon
        assert c["status_per_round"] == ["trained", "trained"] and len(c["epsilon_per_round"]) == 2
        assert c["budget_epsilon"] == 8.0 and c["delta"] == 1e-5 and c["key_fingerprint"].startswith("SHA256:")
    assert report["never_sampled"] == {"count": 1997, "ids": never}
    assert report["audit"]["status"] == "unverified" and report["audit"]["unverified"] == never
    assert len(report["audit"]["gaps"]) == 1 and "1997 clients" in report["audit"]["gaps"][0]


def test_report_pages_stay_small_and_count_the_others(crowd_run):
    _, paths = crowd_run
    page, md = paths["html"].read_text(), paths["md"].read_text()
    assert paths["html"].stat().st_size < 200_000 and paths["md"].stat().st_size < 50_000
    assert page.count('class="series"') == 3  # one epsilon series per client that took part
    sentence = "1997 configured client(s) never took part"
    assert 'id="never-sampled"' in page and sentence in page and sentence in md
    shown = ", ".join(f"client-{i}" for i in range(10))
    assert f"{shown} and 1987 more" in page and f"{shown} and 1987 more" in md
    assert "client-10," not in page and "client-1996" not in page and "client-1996" not in md
    assert page.count("<li>unverified: ") == 1 and md.count("- **unverified:** ") == 1
    assert "client-4 and 1992 more" in page  # the verdict names the first five


def test_configured_client_with_a_folder_of_its_own_is_listed(tmp_path):
    """A client with no ledger row but a folder of its own (an empty ledger: it never trained) gets its entry;
    without the folder it is counted in never_sampled, and a run where everyone took part has none."""
    assert json.loads(write_reports(write_run(tmp_path / "all"))["json"].read_text())["never_sampled"] == {
        "count": 0,
        "ids": [],
    }
    extra = {"num_clients": 4, "clients": [{"id": c} for c in ("alpha", "beta", "gamma", "delta")]}
    run = write_run(tmp_path / "run", rounds=1, config_extra=extra)
    paths = write_reports(run)
    report = json.loads(paths["json"].read_text())
    assert [c["id"] for c in report["clients"]] == ["alpha", "beta", "gamma"]
    assert report["never_sampled"] == {"count": 1, "ids": ["delta"]}
    assert (
        "1 configured client(s) never took part" in paths["html"].read_text() and ": delta." in paths["md"].read_text()
    )
    (run / "clients" / "delta").mkdir()
    Ledger(run / "clients" / "delta" / "ledger.sqlite").close()
    report = json.loads(write_reports(run)["json"].read_text())
    assert [c["id"] for c in report["clients"]] == ["alpha", "beta", "gamma", "delta"]
    delta = report["clients"][3]
    assert delta["rounds_trained"] == 0 and delta["final_epsilon"] == 0.0 and delta["status_per_round"] == [None]
    assert report["never_sampled"] == {"count": 0, "ids": []}
    assert 'id="never-sampled"' not in write_reports(run)["html"].read_text()


def test_client_only_metrics_json_knows_of_is_listed(tmp_path):
    """Sampled, but it never answered and nothing else recorded it: metrics.json's status still shows."""
    from fedllm.metrics import ClientRound
    from fedllm.metrics import write as write_metrics

    extra = {"num_clients": 4, "clients": [{"id": c} for c in ("alpha", "beta", "gamma", "delta")]}
    run = write_run(tmp_path / "run", rounds=1, config_extra=extra)
    m = read_metrics(run / "metrics.json")
    m.rounds[0].clients["delta"] = ClientRound(status="dropped")
    write_metrics(m, run / "metrics.json")
    report = json.loads(write_reports(run)["json"].read_text())
    assert [c["id"] for c in report["clients"]][3:] == ["delta"] and report["never_sampled"]["count"] == 0
    assert report["clients"][3]["status_per_round"] == ["dropped"] and report["clients"][3]["rounds_trained"] == 0
