"""devid-agent: the device-side trust agent (policy and protocols; see hal/ for hardware)."""

__version__ = "0.1.0"
