"""The block server: connections, sessions, KV cache budget, block execution and announcements."""
