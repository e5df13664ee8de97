"""Moving KV between daemons: transfers, peer sharing, link-aware codec choice (docs/migration.md)."""
