"""Hardening and resilience suite: crashes, dependency faults, corruption, hostile input, isolation, soak."""
