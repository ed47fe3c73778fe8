"""The channel as wiring builds it: on only with brokers, a component of the daemon's parts, the
TPM context let go for attempts only on a TPM without a resource manager when proof-of-possession
may sign inside the EST connection; `config check` warns about unsigned commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import wiring
from agent.config import parse_config
from tests.conftest import ROOT

BASE = '[device]\nid = "gw-7"\n[paths]\nstate_dir = "/tmp/devid-mqtt-wiring"\n'
MQTT = '[mqtt]\nbrokers = ["mqtts://b1:8883", "mqtts://b2"]\nca_file = "/etc/ca.pem"\n'


@pytest.mark.parametrize(
    ("extra", "released"),
    [
        ('[tpm]\ntcti = "swtpm:host=127.0.0.1,port=2321"\n', True),
        ('[tpm]\ntcti = "device:/dev/tpmrm0"\n', False),
        ('[tpm]\ntcti = "swtpm:port=1"\n[est]\nproof_of_possession = "never"\n', False),
        ('[keys]\nstore = "software"\n[tpm]\ntcti = "swtpm:port=1"\n', False),
        # TLS 1.3 only: no tls-unique, no proof-of-possession to make room for
        ('[tls]\nmin_version = "1.3"\n[tpm]\ntcti = "swtpm:port=1"\n', False),
    ],
)
def test_the_channel_and_when_it_lets_go_of_its_tpm_context(extra: str, released: bool) -> None:
    channel = wiring.mqtt_channel(parse_config(BASE + extra + MQTT))
    assert channel.name == "mqtt"
    settings = channel._s
    assert [str(b) for b in settings.brokers] == ["mqtts://b1:8883", "mqtts://b2:8883"]
    assert settings.client_id == "gw-7" and settings.topics.status == "devid/gw-7/status"
    assert settings.release_for_attempts is released


def test_config_check_warns_about_unsigned_commands(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(BASE + MQTT + "insecure_unsigned_commands = true\n")
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "config", "check", "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout == "OK\n"
    assert "warning: mqtt.insecure_unsigned_commands is on" in done.stderr
