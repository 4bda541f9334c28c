"""Planning a swarm's throughput (pure functions, no I/O): which blocks each server holds, how
much of its span it offloads to host memory, and the micro-batch size (docs/architecture.md,
*Planner*)."""
