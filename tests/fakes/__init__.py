def serve_until_interrupted(stop) -> None:
    """A fake run on its own (python -m tests.fakes.<name>): serve until Ctrl-C or SIGTERM, then
    stop() (which removes what the fake made: instances, their processes, its folder)."""
    import signal
    import time

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop()
