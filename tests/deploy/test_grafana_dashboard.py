"""deploy/grafana/megabatch.json: a dashboard over the $datasource with run and rank
variables, whose every query reads only metrics the ranks export (or the recording
rules), parses as PromQL and returns data from a run's series (promtool, offline; the
live test against a real Prometheus uses ``dashboard.panel_queries``)."""

import shutil
import subprocess

import pytest
import yaml

from tests.deploy.dashboard import (
    CUDA_ONLY_METRICS,
    DASHBOARD,
    OTHER_METRICS,
    SPEC_METRICS,
    concrete,
    iter_panels,
    load,
    metric_names,
    panel_queries,
    queries,
    recording_rules,
)

DS = "${datasource}"
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not on PATH (it comes with Prometheus: apt-get install prometheus)",
)


def variables() -> dict[str, dict]:
    return {v["name"]: v for v in load()["templating"]["list"]}


def test_dashboard_loads():
    dashboard = load()
    assert dashboard["title"] and dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    ids = [panel["id"] for panel in iter_panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_variables():
    found = variables()
    datasource = found["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    run, rank = found["run"], found["rank"]
    assert run["definition"] == "label_values(megabatch_step, run)"
    assert (
        rank["definition"]
        == 'label_values(megabatch_last_step_timestamp_seconds{run=~"$run"}, rank)'
    )
    for variable in (run, rank):
        assert variable["type"] == "query"
        assert variable["datasource"]["uid"] == DS
        assert variable["query"]["query"] == variable["definition"]
        assert variable["multi"] and variable["includeAll"]
        assert variable["allValue"] == ".*"


def test_every_panel_has_a_query_and_uses_the_datasource():
    for panel in iter_panels(load()):
        title = panel["title"]
        assert panel["type"] in ("timeseries", "stat"), title
        assert panel["datasource"] == {"type": "prometheus", "uid": DS}, title
        targets = panel["targets"]
        assert any(target.get("expr") for target in targets), title
        for target in targets:
            assert target.get("datasource", {"uid": DS})["uid"] == DS, title
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), title
        # A CPU run must show something in every panel.
        assert any(not target.get("megabatch_cuda_only") for target in targets), title


def test_queries_read_only_exported_metrics():
    allowed = SPEC_METRICS | recording_rules()
    for query in queries():
        names = metric_names(query.expr)
        assert names, query
        unknown = {n for n in names if n not in allowed and not OTHER_METRICS.match(n)}
        assert not unknown, (query.panel, unknown)
        # The flag says it: the CUDA-only metrics appear in flagged targets only.
        assert query.cuda_only == bool(names & CUDA_ONLY_METRICS), query


def test_queries_filter_by_the_variables():
    for query in queries():
        assert 'run=~"$run"' in query.expr, query
        assert '="$' not in query.expr, query  # =~ so that All (.*) and multi-values match
        assert "$" not in concrete(query.expr), query


def test_panel_queries():
    found = panel_queries(DASHBOARD)
    titles = {title for title, _, _ in found}
    assert {"Loss", "Throughput (samples/s)", "Step time by rank", "Memory by rank"} <= titles
    assert any(cuda for _, _, cuda in found)
    assert all(isinstance(expr, str) and expr for _, expr, _ in found)


def test_metric_names():
    expr = (
        'histogram_quantile(0.9, sum by (run, rank, le) (rate(megabatch_step_duration_seconds_bucket{run=~"$run"}[5m])))'
        " / on (run) group_left () megabatch:samples_per_second:rate5m offset 15m"
        " and abs(megabatch_loss) == Inf or time() - up > 1e3"
    )
    assert metric_names(expr) == {
        "megabatch_step_duration_seconds_bucket",
        "megabatch:samples_per_second:rate5m",
        "megabatch_loss",
        "up",
    }


@needs_promtool
def test_queries_parse(tmp_path):
    rules = [
        {"record": f"dashboard:query_{i}", "expr": concrete(q.expr)}
        for i, q in enumerate(queries())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


# Two ranks of one run, a series for every metric (sparse and CUDA-only ones included),
# as a scrape labels them: the target's run, rank, node, plus job and instance.
RANK = {0: 'job="megabatch", instance="node0:9431", run="r1", rank="0", node="node0"',
        1: 'job="megabatch", instance="node0:9432", run="r1", rank="1", node="node0"'}  # fmt: skip
GLOBAL = {
    'megabatch_run_info{task="clip", model="tiny", world_size="2", global_batch="64", %s}': "1x60",
    "megabatch_step{%s}": "0+10x60",
    "megabatch_max_steps{%s}": "1000x60",
    "megabatch_samples_total{%s}": "0+640x60",
    "megabatch_loss{%s}": "5-0.01x60",
    "megabatch_learning_rate{%s}": "0.001x60",
    "megabatch_logit_scale{%s}": "14.3x60",
    "megabatch_nonfinite_steps_total{%s}": "0x60",
    'megabatch_eval_score{metric="zeroshot_top1", %s}': "0.1x60",
    "megabatch_checkpoint_duration_seconds{%s}": "3x60",
    "megabatch_checkpoint_size_bytes{%s}": "1e6x60",
    "megabatch_last_checkpoint_timestamp_seconds{%s}": "0x10 600x50",
    "megabatch_checkpoint_interval_seconds{%s}": "1800x60",
    "megabatch_checkpoint_failures_total{%s}": "0x60",
}
PER_RANK = {
    'megabatch_build_info{version="0.1", python="3.11", torch="2.5", deepspeed="0.16", %s}': "1x60",
    'megabatch_step_duration_seconds_bucket{le="0.5", %s}': "0x60",
    'megabatch_step_duration_seconds_bucket{le="1", %s}': "0+10x60",
    'megabatch_step_duration_seconds_bucket{le="+Inf", %s}': "0+10x60",
    "megabatch_step_duration_seconds_sum{%s}": "0+8x60",
    "megabatch_step_duration_seconds_count{%s}": "0+10x60",
    "megabatch_data_wait_seconds_total{%s}": "0+1x60",
    "megabatch_last_step_timestamp_seconds{%s}": "0+60x60",
    'megabatch_skipped_samples_total{reason="corrupt_image", %s}': "0+1x60",
    "megabatch_device_memory_bytes{%s}": "1e9x60",
    "megabatch_device_memory_peak_bytes{%s}": "2e9x60",
    "process_resident_memory_bytes{%s}": "5e8x60",
    "process_start_time_seconds{%s}": "0x60",
    "up{%s}": "1x60",
}


# What a CPU run has before its first evaluation, checkpoint or skipped sample, with
# train.checkpoint_every_minutes null: the series sparse and CUDA-only queries need.
LATER = ("megabatch_eval_score", "megabatch_skipped_samples_total", "megabatch_device_memory",
         "megabatch_checkpoint_interval_seconds")  # fmt: skip


@needs_promtool
@pytest.mark.parametrize("run", ["every series", "a CPU run before any event"])
def test_queries_return_data(tmp_path, run):
    """Each query, as an absent(...) alert over a run's series: none may fire. Before
    any event, every query that is neither sparse nor CUDA-only must have data."""
    found = queries()
    if run != "every series":
        found = [q for q in found if not (q.sparse or q.cuda_only)]
    rules = [
        {"alert": f"DashboardQuery{i}", "expr": f"absent({concrete(q.expr)})"}
        for i, q in enumerate(found)
    ]
    (tmp_path / "rules.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    series = [{"series": name % RANK[0], "values": values} for name, values in GLOBAL.items()]
    series += [
        {"series": name % labels, "values": values}
        for name, values in PER_RANK.items()
        for labels in RANK.values()
    ]
    if run != "every series":
        series = [s for s in series if not s["series"].startswith(LATER)]
        for s in series:
            if s["series"].startswith("megabatch_last_checkpoint_timestamp_seconds"):
                s["values"] = "0x60"  # prometheus-client's gauges read 0 until set
    checks = [{"eval_time": "30m", "alertname": rule["alert"], "exp_alerts": []} for rule in rules]
    test = {"rule_files": ["rules.yml"], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": checks}]}  # fmt: skip
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    proc = subprocess.run(["promtool", "test", "rules", "test.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        empty = [(q.panel, q.ref_id, q.expr) for i, q in enumerate(found)
                 if f'alertname="DashboardQuery{i}"' in output]  # fmt: skip
        pytest.fail(f"queries without data: {empty}\n{output}")
