"""RFC 7030 EST client."""
