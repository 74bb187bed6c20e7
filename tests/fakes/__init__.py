

def serve_until_interrupted(stop) -> None:
    """A fake run on its own (python -m tests.fakes.<name>): serve until Ctrl-C, then stop()."""
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop()
