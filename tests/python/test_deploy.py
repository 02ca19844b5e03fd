"""deploy/ is what operators import: these tests hold it to the running code.

* Every courier_ (and process_) metric the Grafana dashboard and the Prometheus alert rules
  query exists on the /metrics of a real node this test starts (histogram
  queries as their _bucket series), except the few named in FLEET_ONLY,
  which only fleet mode's processes export (gateway/tests/fleet.rs checks
  them on real routers and gateways) and which docs/operations.md must list
  in its fleet sections.
* The systemd unit passes `systemd-analyze verify` (or, where that tool is
  missing, a structural parse with known sections and keys).
* The Kubernetes manifests and the alert rules parse as YAML with the fields
  the rest of deploy/ relies on; the dashboard parses as JSON.
"""

import configparser
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
GATEWAY = Path(os.environ.get("COURIER_GATEWAY_BIN", ROOT / "target/release/gateway"))

# Series only a fleet's processes export (its routers, or every process
# with a NATS link); a single node has none.
FLEET_ONLY = {
    "courier_router_partitions_served",
    "courier_fleet_gateways_live",
    "courier_fleet_gateways_expired_total",
    "courier_fleet_detach_notices_total",
    "courier_fleet_link_gaps_total",
    "courier_router_leases_lost_total",
    "courier_nats_call_seconds_bucket",
    "courier_nats_call_failures_total",
    "courier_nats_rtt_seconds_bucket",
    "courier_nats_connected",
}

METRIC = re.compile(r"\b(?:courier|process)_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana/courier.json").read_text())


def alert_rules() -> list:
    doc = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list:
    out = []

    def walk(panels):
        for p in panels:
            out.extend(t["expr"] for t in p.get("targets", []) if "expr" in t)
            walk(p.get("panels", []))

    walk(dashboard()["panels"])
    return out


def queried_metrics() -> dict:
    """Metric name -> the expressions that use it."""
    exprs = dashboard_exprs() + [r["expr"] for r in alert_rules()]
    names = {}
    for expr in exprs:
        for name in METRIC.findall(expr):
            names.setdefault(name, []).append(expr)
    return names


def scrape_series(text: str) -> set:
    """Every series name a scrape can be queried by, from samples and from
    # TYPE lines (a labelled family with no children yet has only those)."""
    series = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "counter":
                series.add(name + "_total")
            elif kind == "histogram":
                series.update(name + s for s in HISTOGRAM_SUFFIXES)
            else:
                series.add(name)
        elif line and not line.startswith("#"):
            series.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return series


@pytest.fixture
def metrics_text(tmp_path):
    if not GATEWAY.exists():
        pytest.fail(f"no gateway binary at {GATEWAY}")
    port, metrics_port = free_port(), free_port()
    log = open(tmp_path / "gateway.log", "wb")
    proc = subprocess.Popen(
        [str(GATEWAY), "--listen", f"127.0.0.1:{port}",
         "--metrics-listen", f"127.0.0.1:{metrics_port}",
         "--cores", "1", "--data-dir", str(tmp_path / "data")],
        stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=2) as r:
                    assert r.status == 200
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
                    yield r.read().decode()
                return
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"gateway not ready; see {log.name}")
                time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        log.close()


def test_every_metric_the_dashboard_and_alerts_query_exists_on_a_running_node(metrics_text):
    queried = queried_metrics()
    assert len(queried) > 15, queried
    exported = scrape_series(metrics_text)
    missing = {}
    for name, exprs in sorted(queried.items()):
        if name in FLEET_ONLY:
            assert name not in exported, f"{name} is exported by a single node: drop it from FLEET_ONLY"
            continue
        if name not in exported:
            missing[name] = exprs[0]
    assert not missing, f"queried but not exported: {missing}"
    # histogram_quantile only works on bucket series.
    for name, exprs in queried.items():
        for expr in exprs:
            if "histogram_quantile" in expr and name.endswith("_seconds"):
                pytest.fail(f"{name} used without _bucket in {expr}")


def test_router_only_series_are_documented():
    ops = (ROOT / "docs/operations.md").read_text()
    section = ops[ops.index("### Router process (fleet mode)"):ops.index("## The dashboard")]
    for name in sorted(FLEET_ONLY):
        family = re.sub(r"_bucket$", "", name)
        assert f"`{family}`" in section, f"{family} is not in operations.md's fleet sections"


def test_every_exported_metric_is_documented(metrics_text):
    ops = (ROOT / "docs/operations.md").read_text()
    families = {line.split()[2] for line in metrics_text.splitlines() if line.startswith("# TYPE ")}
    kinds = {line.split()[2]: line.split()[3] for line in metrics_text.splitlines() if line.startswith("# TYPE ")}
    for family in sorted(families):
        shown = family + "_total" if kinds[family] == "counter" else family
        assert shown in ops, f"{shown} is exported but not in docs/operations.md"


def test_every_configuration_key_is_in_the_operations_table():
    import tomllib

    config = tomllib.loads((ROOT / "deploy/courier.toml").read_text())
    ops = (ROOT / "docs/operations.md").read_text()
    table = ops[ops.index("| key | flag / variable"):ops.index("## Health and readiness")]
    rows = [row.split("|")[1] for row in table.splitlines() if row.startswith("| `")]
    for section, keys in config.items():
        for key in keys:
            # A row names `section.key`, or several keys of one section
            # (`push.backoff_ms`, `push.backoff_max_ms`; `push_apns.key_file`, `.key_id`).
            assert any(
                f"`{section}.{key}`" in row or (f"`{section}." in row and f"`.{key}`" in row)
                or (f"`{section}." in row and f", `{section}.{key}`" in row)
                for row in rows
            ), f"{section}.{key} is in deploy/courier.toml but not in docs/operations.md's configuration table"


def test_metric_names_follow_prometheus_conventions(metrics_text):
    for line in metrics_text.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split(maxsplit=3)
        assert name.startswith(("courier_", "process_")), name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        if kind == "histogram" and "duration" in name:
            assert name.endswith("_seconds"), f"{name}: durations are in seconds"
        if kind == "gauge":
            assert not name.endswith("_total"), f"{name}: _total is for counters"
    # No label names a user, a device or a conversation.
    labels = set(re.findall(r"[{,]([a-z_]+)=", metrics_text))
    assert not labels & {"user", "device", "conversation", "session"}, labels


def test_dashboard_is_importable_json():
    d = dashboard()
    assert d["title"] and d["uid"] and d["schemaVersion"] >= 30
    assert any(i["name"] == "DS_PROMETHEUS" for i in d["__inputs"])
    ids = set()
    for p in d["panels"]:
        assert p["id"] not in ids, f"duplicate panel id {p['id']}"
        ids.add(p["id"])
        if p["type"] != "row":
            assert p["targets"], p["title"]
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24, p["title"]
    titles = " ".join(p["title"].lower() for p in d["panels"])
    for wanted in ("delivery latency", "sent-ack latency", "connections", "messages in / out",
                   "queue", "slow-consumer", "auth failures", "store commit", "push", "nats"):
        assert wanted in titles, wanted


def test_alert_rules_parse_and_cover_what_operators_page_on():
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    for wanted in ("CourierNodeDown", "CourierDeliveryLatencyHigh", "CourierOutboundQueuesGrowing",
                   "CourierStoreCommitSlow", "CourierAuthFailuresHigh", "CourierGatewayExpired"):
        assert wanted in names, wanted
    ops = (ROOT / "docs/operations.md").read_text()
    for r in rules:
        assert r["expr"].strip() and r["labels"]["severity"] in ("critical", "warning", "info"), r
        assert r["annotations"]["summary"], r["alert"]
        assert r["alert"] in ops, f"{r['alert']} is not explained in docs/operations.md"
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert "alerts.yml" in scrape["rule_files"]
    assert {"courier", "nats"} <= {j["job_name"] for j in scrape["scrape_configs"]}
    delivery = next(r for r in rules if r["alert"] == "CourierDeliveryLatencyHigh")
    assert "courier_delivery_duration_seconds_bucket" in delivery["expr"] and "> 1" in delivery["expr"]


def k8s_docs():
    out = []
    for path in sorted((DEPLOY / "k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc and "kind" in doc and "apiVersion" in doc, path
            out.append((path.relative_to(DEPLOY), doc))
    return out


def test_kubernetes_manifests_parse_with_probes_drain_and_grace():
    docs = k8s_docs()
    kinds = [(str(p), d["kind"], d["metadata"]["name"]) for p, d in docs]
    nats = next(d for p, d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "nats")
    assert nats["spec"]["replicas"] == 3
    conf = next(d for p, d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "nats-config")
    assert "jetstream" in conf["data"]["nats.conf"] and "sync_interval: always" in conf["data"]["nats.conf"]
    workloads = [(p, d) for p, d in docs if d["kind"] in ("Deployment", "StatefulSet")
                 and d["metadata"]["name"].startswith("courier-")]
    assert {d["metadata"]["name"] for _, d in workloads} >= {
        "courier-gateway", "courier-gateway-fleet", "courier-router"}, kinds
    for path, d in workloads:
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        name = d["metadata"]["name"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], name
        # Longer than the preStop wait plus the drain (5 s of close wait
        # after the queued frames) plus the store's close.
        assert spec["terminationGracePeriodSeconds"] >= 30, name
        if "gateway" in name:
            assert c["lifecycle"]["preStop"], name
            assert spec["terminationGracePeriodSeconds"] > c["lifecycle"]["preStop"]["sleep"]["seconds"] + 10
        if "fleet" in str(path):
            role = "router" if "router" in name else "gateway"
            assert c["args"][c["args"].index("--role") + 1] == role, path


def test_single_node_manifest_config_loads_in_the_gateway(tmp_path):
    """The ConfigMap's courier.toml is a configuration the binary accepts."""
    if not GATEWAY.exists():
        pytest.fail(f"no gateway binary at {GATEWAY}")
    for path, d in k8s_docs():
        if d["kind"] == "ConfigMap" and "courier.toml" in d.get("data", {}):
            f = tmp_path / "courier.toml"
            f.write_text(d["data"]["courier.toml"])
            env = {k: v for k, v in os.environ.items() if not k.startswith("COURIER_")}
            out = subprocess.run([str(GATEWAY), "--config", str(f), "--print-config"],
                                 capture_output=True, text=True, env=env, timeout=30)
            assert out.returncode == 0, f"{path} {d['metadata']['name']}: {out.stderr}"


UNIT_KEYS = {
    "Unit": {"Description", "Documentation", "After", "Wants", "Requires"},
    "Install": {"WantedBy"},
}


def test_systemd_unit_verifies(tmp_path):
    unit = DEPLOY / "courier-gateway.service"
    text = unit.read_text()
    # Structural parse, always: known sections and keys. Not strict: systemd
    # lets a key repeat (SystemCallFilter does).
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read_string(text)
    assert set(parser.sections()) == {"Unit", "Service", "Install"}
    for section, keys in UNIT_KEYS.items():
        assert set(parser[section]) <= keys, (section, set(parser[section]) - keys)
    service = parser["Service"]
    for key in ("ExecStart", "ProtectSystem", "NoNewPrivileges", "PrivateTmp", "LimitNOFILE",
                "RestrictAddressFamilies", "SystemCallFilter", "TimeoutStopSec", "ReadWritePaths"):
        assert key in service, key
    assert service["ProtectSystem"] == "strict"
    assert int(service["TimeoutStopSec"]) > 10
    if shutil.which("systemd-analyze") is None:
        return
    # systemd-analyze checks that ExecStart names an executable: point the
    # copy at the built binary.
    copy = tmp_path / unit.name
    copy.write_text(text.replace("/usr/local/bin/gateway", str(GATEWAY.resolve())))
    out = subprocess.run(["systemd-analyze", "verify", str(copy)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "courier-gateway.service" not in out.stderr, out.stderr
