"""The [mqtt] section: off by default, on with brokers, every mistake one line naming the key."""

from __future__ import annotations

import pytest

from agent.config import parse_config
from agent.errors import ConfigError

MINIMAL = '[device]\nid = "gw-7"\n'
ON = MINIMAL + '[mqtt]\nbrokers = ["mqtts://mqtt.example:8883"]\nca_file = "/etc/ca.pem"\n'


def test_off_by_default_and_on_with_brokers() -> None:
    assert not parse_config(MINIMAL).mqtt.enabled
    config = parse_config(ON)
    assert config.mqtt.enabled
    assert config.mqtt.protocol == "5" and config.mqtt.qos == 1
    assert config.mqtt.client_id == ""  # the device id


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL + "[mqtt]\nbrokers = ['mqtt://plain:1883']\n", "mqtt.brokers[0]: expected an mqtts://host[:port] URL (TLS only; port 8883 when omitted), got 'mqtt://plain:1883'"),
        (MINIMAL + "[mqtt]\nbrokers = ['mqtts://h:99999']\n", "mqtt.brokers[0]: expected an mqtts://host[:port] URL"),
        (MINIMAL + "[mqtt]\nbrokers = ['mqtts://u:p@h']\n", "mqtt.brokers[0]: expected an mqtts://host[:port] URL"),
        (MINIMAL + "[mqtt]\nbrokers = ['mqtts://h/x']\n", "mqtt.brokers[0]: expected an mqtts://host[:port] URL"),
        (MINIMAL + "[mqtt]\nbrokers = ['mqtts://h']\n", "mqtt.ca_file: not set; the broker's CA file is required with mqtt.brokers"),
        (ON + "topic_prefix = 'a/+/b'\n", "mqtt.topic_prefix: expected a topic prefix"),
        (ON + "topic_prefix = '$SYS'\n", "mqtt.topic_prefix: expected a topic prefix"),
        (ON + "topic_prefix = 'a//b'\n", "mqtt.topic_prefix: expected a topic prefix"),
        (ON + "client_id = 'gw/7'\n", "mqtt.client_id: expected a client id of at most 128 characters without '+', '#', '/' or NUL, got 'gw/7'"),
        (ON + "client_id = 'gw#7'\n", "mqtt.client_id: expected a client id"),
        (ON + "keepalive_seconds = 1\n", "mqtt.keepalive_seconds: expected an integer from 5 to 65535 (seconds), got 1"),
        (ON + "reconnect_min_seconds = 10.0\nreconnect_max_seconds = 5.0\n", "mqtt.reconnect_min_seconds: 10 exceeds mqtt.reconnect_max_seconds (5)"),
        (ON + "reconnect_max_seconds = inf\n", "mqtt.reconnect_max_seconds: expected a finite number, got inf"),
        (ON + "qos = 0\n", "mqtt.qos: expected 1 or 2 (events and commands must not be lost), got 0"),
        (ON + "protocol = '3'\n", "mqtt.protocol: expected '5' or '3.1.1', got '3'"),
        (ON + "protocol = 5\n", "mqtt.protocol: expected a string, got 5"),
        (ON + "status_interval_seconds = 1\n", "mqtt.status_interval_seconds: expected a number of seconds from 10 to 86400 (a day), got 1"),
        (ON + "max_payload_bytes = 100\n", "mqtt.max_payload_bytes: expected an integer from 1024 to 1048576 (1 MiB), got 100"),
        (ON + "session_expiry_seconds = -1\n", "mqtt.session_expiry_seconds: expected an integer from 0 to 604800"),
        (ON + "offline_queue_events = 0\n", "mqtt.offline_queue_events: expected an integer from 1 to 10000, got 0"),
        (ON + "command_trust_anchor = 'anchor.pem'\n", "mqtt.command_trust_anchor: expected an absolute path, got 'anchor.pem'"),
        (ON + "insecure_unsigned_commands = 'yes'\n", "mqtt.insecure_unsigned_commands: expected true or false, got 'yes'"),
        (ON + "connect_timeout_seconds = 0\n", "mqtt.connect_timeout_seconds: expected a number of seconds greater than 0"),
        (ON.replace('"gw-7"', '"gw/7"'), "device.id: 'gw/7' contains '/', which MQTT topics cannot carry (mqtt.brokers is set)"),
        (ON.replace('"gw-7"', '"gw+7"'), "device.id: 'gw+7' contains '+'"),
        (ON.replace('"gw-7"', '"gw\\u00007"'), "device.id: expected a string without control characters"),
    ],
)  # fmt: skip
def test_mistakes_are_one_line_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_device_id_with_a_slash_is_fine_without_mqtt() -> None:
    assert parse_config(MINIMAL.replace("gw-7", "gw/7")).device.id == "gw/7"
