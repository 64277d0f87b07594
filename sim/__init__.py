"""Virtual-time event loop and simulated network running the real node and server code."""
