"""The metrics textfile: rendered from the real status of a device (an identity enrolled from our
EST server, root's firmware state on a rig), written atomically 0644, and parsed back with
prometheus_client's own text parser."""

from __future__ import annotations

import io
import json
import stat
from contextlib import redirect_stderr, redirect_stdout
from datetime import datetime, timedelta, timezone
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent.cli import EXIT_CONFIG, main
from agent.config import load_config
from agent.metrics import RenewalFacts, render
from agent.status import AgentStatus, IdentityStatus
from agent.wiring import enroller, write_metrics
from tests.support import firmware as fw
from tests.support.enroll_env import write_config
from tests.support.est_server import EstOptions, EstServer

NOW = datetime(2026, 3, 1, tzinfo=timezone.utc)


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def value(metrics: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    [(_, v)] = metrics["devid_agent_" + name]
    return v


def test_not_enrolled_renders_what_is_known_and_leaves_out_what_is_not() -> None:
    status = AgentStatus("gw", "<c>", IdentityStatus(state="none"), None, None)
    m = parse(render(status, None, NOW))
    assert m["devid_agent_build_info"] == [({"version": __version__}, 1.0)]
    assert value(m, "identity_valid") == 0
    assert "devid_agent_certificate_not_after_timestamp_seconds" not in m
    assert "devid_agent_renewal_last_success_timestamp_seconds" not in m
    assert value(m, "metrics_generated_timestamp_seconds") == NOW.timestamp()


def test_label_values_are_escaped() -> None:
    status = AgentStatus("gw", "<c>", IdentityStatus(state='x"\\\ny'), None, None, version='1"\n')
    m = parse(render(status, None, NOW))
    assert m["devid_agent_identity_info"][0][0]["state"] == 'x"\\\ny'
    assert m["devid_agent_build_info"][0][0]["version"] == '1"\n'


def test_renewal_facts_become_timestamps_in_seconds() -> None:
    status = AgentStatus("gw", "<c>", IdentityStatus(state="none"), None, None)
    facts = RenewalFacts(
        last_success=NOW - timedelta(hours=1), last_attempt=NOW, consecutive_failures=3
    )
    m = parse(render(status, facts, NOW))
    assert value(m, "renewal_last_success_timestamp_seconds") == NOW.timestamp() - 3600
    assert value(m, "renewal_consecutive_failures") == 3


def test_metrics_write_of_an_enrolled_device_is_atomic_public_and_parses(tmp_path: Path) -> None:
    textfile = tmp_path / "prom" / "devid-agent.prom"
    textfile.parent.mkdir()
    with EstServer(tmp_path / "est", EstOptions()) as est:
        config_path = write_config(
            tmp_path / "config.toml", state_dir=tmp_path / "state", est=est, store="software"
        )
        with open(config_path, "a") as f:
            f.write(f'[metrics]\ntextfile = "{textfile}"\n')
        config = load_config(config_path)
        result = enroller(config).enroll()
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["--config", str(config_path), "metrics", "write"])
    assert code == 0 and out.getvalue() == f"wrote {textfile}\n"
    assert stat.S_IMODE(textfile.stat().st_mode) == 0o644
    assert [p.name for p in textfile.parent.iterdir()] == ["devid-agent.prom"]  # no temp left
    m = parse(textfile.read_text())
    cert = result.identity.certificate
    assert value(m, "identity_valid") == 1
    assert value(m, "certificate_not_after_timestamp_seconds") == (
        cert.not_valid_after_utc.timestamp()
    )
    assert 0.9 < value(m, "certificate_lifetime_left_ratio") <= 1
    assert m["devid_agent_identity_info"][0][0]["key_store"] == "software"
    assert value(m, "identity_generation") == 1 and value(m, "est_pending") == 0
    anchor_end = est.root.cert.not_valid_after_utc.timestamp()
    assert value(m, "trust_anchor_not_after_timestamp_seconds") == anchor_end
    assert value(m, "ca_certificates_not_after_timestamp_seconds") == anchor_end  # the root alone
    # and `status` shows the same trust, in text and JSON
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        assert main(["--config", str(config_path), "status", "--json"]) == 0
    trust = json.loads(out.getvalue())["trust"]
    assert trust["anchor_file"] == str(est.ca_file) and trust["ca_certificates"] == 1
    assert trust["anchor_not_after"] == trust["ca_set_not_after"] != ""
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        assert main(["--config", str(config_path), "status"]) == 0
    assert f"trust:     anchor {est.ca_file} until {trust['anchor_not_after']}" in out.getvalue()


def test_the_service_part_renders_counters_the_channel_and_the_next_renewal() -> None:
    from agent.components import Snapshot
    from agent.metrics import ServiceCounters

    status = AgentStatus("gw", "<c>", IdentityStatus(state="none"), None, None)
    snapshot = Snapshot(
        now=NOW, started_at=NOW - timedelta(hours=2), identity=None, next_action="enroll",
        next_at=NOW + timedelta(minutes=5), reason="", clock_trusted=True,
        consecutive_failures=2, last_attempt=NOW, last_success=None, last_error="down",
        last_disposition="retry_soon", renewal_requested=False,
        components={"mqtt": {"connected": False},
                    "ca_refresh": {"last_success": "2026-02-28T00:00:00Z",
                                   "consecutive_failures": 0,
                                   "next_refresh": "2026-03-02T00:00:00Z"}},
    )  # fmt: skip
    counters = ServiceCounters(
        attempts={("enroll", "retry_soon"): 2, ("enroll", "ok"): 1},
        failures={("enroll", "retry_soon"): 2},
        commands_refused=3,
        ca_refreshes={"same": 4, "changed": 1},
        ca_changes=1,
    )
    m = parse(render(status, None, NOW, (snapshot, counters)))
    assert m["devid_agent_renewal_attempts_total"] == [
        ({"action": "enroll", "disposition": "ok"}, 1.0),
        ({"action": "enroll", "disposition": "retry_soon"}, 2.0),
    ]
    assert m["devid_agent_renewal_failures_total"] == [
        ({"action": "enroll", "disposition": "retry_soon"}, 2.0)
    ]
    assert m["devid_agent_renewal_next_timestamp_seconds"] == [
        ({"action": "enroll"}, NOW.timestamp() + 300)
    ]
    assert value(m, "channel_connected") == 0
    assert value(m, "commands_refused_total") == 3 and value(m, "ca_changes_total") == 1
    refreshes = {labels["result"]: v for labels, v in m["devid_agent_ca_refreshes_total"]}
    assert refreshes == {"changed": 1.0, "same": 4.0}
    assert value(m, "service_start_time_seconds") == NOW.timestamp() - 7200
    assert value(m, "ca_refresh_last_success_timestamp_seconds") == NOW.timestamp() - 86400
    assert value(m, "ca_refresh_consecutive_failures") == 0
    # no trustworthy clock: no next renewal time is claimed
    untrusted = Snapshot(**{**snapshot.__dict__, "clock_trusted": False})
    m = parse(render(status, None, NOW, (untrusted, counters)))
    assert "devid_agent_renewal_next_timestamp_seconds" not in m
    assert value(m, "clock_trusted") == 0


def test_firmware_metrics_from_roots_state(tmp_path: Path) -> None:
    rig = fw.Rig(tmp_path / "dev")
    bundle = rig.write_bundle(
        fw.make_bundle(fw.image(), [rig.vendor.signer], version="2.0", security_version=5)
    )
    assert fw.cli(rig.config, "install", str(bundle))[0] == 0
    rig.reboot()
    assert fw.cli(rig.config, "commit")[0] == 0
    textfile = tmp_path / "fw.prom"
    with open(rig.config, "a") as f:
        f.write(
            f'[paths]\nstate_dir = "{tmp_path / "state"}"\n[metrics]\ntextfile = "{textfile}"\n'
        )
    assert write_metrics(load_config(rig.config)) == textfile
    m = parse(textfile.read_text())
    assert m["devid_agent_firmware_booted_slot_info"] == [({"slot": "B"}, 1.0)]
    assert value(m, "firmware_committed_security_version") == 5
    assert value(m, "firmware_fell_back") == 0


def test_metrics_write_without_a_textfile_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[device]\nid = "gw"\n')
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = main(["--config", str(config), "metrics", "write"])
    assert code == EXIT_CONFIG and "metrics.textfile: not set" in err.getvalue()


def test_a_planted_symlink_at_the_textfile_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    textfile = tmp_path / "m.prom"
    textfile.symlink_to(victim)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[device]\nid = "gw"\n[paths]\nstate_dir = "{tmp_path / "s"}"\n'
        f'[metrics]\ntextfile = "{textfile}"\n'
    )
    write_metrics(load_config(config))
    assert victim.read_text() == "keep" and not textfile.is_symlink()
    assert json.dumps(parse(textfile.read_text())["devid_agent_identity_valid"])
