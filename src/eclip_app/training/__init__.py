"""The trainer's parts: its config, checkpoints, batch sources and logs. The loop that joins
them is `eclip_app.train`."""
