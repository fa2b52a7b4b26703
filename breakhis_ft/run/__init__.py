"""The run: entrypoint, run setup (config -> objects, once), orchestration, run folder, tracking."""
