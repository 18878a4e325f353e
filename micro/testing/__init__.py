"""Test helpers for micro apps and backends: conformance kits, doubles and fixtures."""
