"""Compliance: tamper-evident audit log, field encryption and key management, retention, exports, PHI-free logs."""
